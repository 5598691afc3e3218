"""The run machinery: everything between main.py and the network of model.py.

`run_dir` (the run directory: flags.json, checkpoints, history), `runtime` (how a run executes apart from the
graph: the model to build, threads, micro-batches, towers, schedule lengths), `training` (the training loop),
`evaluation` (a checkpoint over arrays of images, the iteration sweep, the report), `test_mode` (main.py's test
mode: one run's checkpoint on the test set with everything it reports), `attacks` (FGSM and BIM, paper section
6), `cluster` (parameter servers and workers), `progress` (bars and plain lines), `plots` (every picture) and
`cnn` (the paper's baseline CNN, built in place of the capsule network with --model cnn). These modules may
import model.py, capsule_layers.py, hparams.py, `routing`, `capsule_ops`, `data` and one another; never main.py,
the commands or `experiments`. No flags are read here: main.py passes values.
"""
