"""Test set-up: graph mode (tensorflow.compat.v1) and the project root on the import path."""

import os
import sys

import tensorflow.compat.v1 as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
tf.disable_v2_behavior()
