"""Tests of attacks.py (FGSM and BIM, paper section 6), of `--attack` through main.py, and of compare_attacks.py.

The attack step is checked on a linear classifier with fixed weights, whose loss gradient has a known sign;
the command line on a tiny 2-step capsule run and a tiny 2-step CNN run (test_main's helpers).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from run import attacks
import compare_attacks
import model as capsnet
from run.run_dir import UsageError
from test_main import MAIN, assert_png, main_env, read_json, run_main

# A linear classifier of 2x2 images into 2 classes. For label y the cross-entropy's gradient is
# p_other * (w_other - w_y), so its sign is sign(w_other - w_y) whatever the probabilities.
TWO_CLASS_WEIGHTS = np.array([[1.0, -1.0], [-1.0, 1.0], [0.5, 2.0], [3.0, -3.0]])  # [4 pixels, 2 classes]
SIGN_FOR_LABEL_0 = np.array([-1.0, 1.0, 1.0, -1.0])  # sign(w_1 - w_0)
# Three classes; class 2's weight is above both others' on pixels 0, 1 and below on pixels 2, 3, so descending
# its loss moves the pixels by +, +, -, -.
THREE_CLASS_WEIGHTS = np.array([[0.0, 0.0, 5.0], [1.0, -1.0, 5.0], [0.0, 1.0, -5.0], [2.0, 0.0, -5.0]])
TARGET_SIGN = np.array([1.0, 1.0, -1.0, -1.0])
IMAGE_SHAPE = (2, 2, 1)
FLOAT_SLACK = 1e-6  # float32 rounding of x +- epsilon


def linear_objective(weights, loss="cross_entropy"):
    """The interface attacks.build_step needs: (images, labels) -> (summed loss, scores `[N, L]`)."""

    def objective(images, labels):
        flat = tf.reshape(images, [-1, weights.shape[0]])  # [N, 4]
        logits = tf.matmul(flat, tf.constant(weights, tf.float32))  # [N, L]
        if loss == "spread":
            return capsnet.spread_loss(logits, labels, 0.2), logits
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)), logits

    return objective


def unit_bounds(count):
    return np.zeros(count, np.float32), np.ones(count, np.float32)


class AttackStepTest(tf.test.TestCase):
    def _perturb(self, weights, clean, labels, direction, epsilon, step_size=None, steps=1, bounds=None, loss=None):
        """`attacks.perturb` on the linear classifier; FGSM unless `steps` or `step_size` say otherwise."""
        step = attacks.build_step(linear_objective(weights, loss or "cross_entropy"), clean.shape[1:])
        bounds = unit_bounds(len(clean)) if bounds is None else bounds
        size = epsilon if step_size is None else step_size
        with self.session() as sess:
            return attacks.perturb(sess, step, clean, np.asarray(labels), direction, bounds, epsilon, size, steps)

    def test_fgsm_follows_the_known_gradient_sign(self):
        """Untargeted FGSM moves every pixel by epsilon along sign(w_other - w_label) (both labels), clipped to
        [0, 1] (0.95 + 0.1 stops at 1, 0.02 - 0.1 at 0)."""
        clean = np.array([[0.5, 0.5, 0.95, 0.02], [0.5, 0.5, 0.5, 0.5]], np.float32).reshape((2,) + IMAGE_SHAPE)
        adversarial, zero = self._perturb(TWO_CLASS_WEIGHTS, clean, [0, 1], 1.0, 0.1)
        expected = np.clip(clean.reshape(2, 4) + 0.1 * np.stack([SIGN_FOR_LABEL_0, -SIGN_FOR_LABEL_0]), 0.0, 1.0)
        self.assertAllClose(adversarial.reshape(2, 4), expected, atol=FLOAT_SLACK)
        self.assertAllClose(adversarial[0].ravel(), [0.4, 0.6, 1.0, 0.0], atol=FLOAT_SLACK)
        self.assertFalse(zero.any())

    def test_targeted_descends_the_target_loss(self):
        """A targeted step (direction -1) lowers the loss of the target class: pixels move towards class 2's
        weights, whatever the true label."""
        clean = np.full((2,) + IMAGE_SHAPE, 0.5, np.float32)
        adversarial, _ = self._perturb(THREE_CLASS_WEIGHTS, clean, [2, 2], -1.0, 0.1)
        self.assertAllClose(adversarial.reshape(2, 4), 0.5 + 0.1 * np.stack([TARGET_SIGN] * 2), atol=FLOAT_SLACK)

    def test_epsilon_zero_changes_nothing(self):
        """FGSM and BIM at epsilon 0 return the clean images exactly."""
        clean = np.random.RandomState(0).rand(3, *IMAGE_SHAPE).astype(np.float32)
        for steps in (1, 5):
            adversarial, _ = self._perturb(TWO_CLASS_WEIGHTS, clean, [0, 1, 0], 1.0, 0.0, step_size=0.0, steps=steps)
            self.assertAllEqual(adversarial, clean)

    def test_perturbations_stay_within_epsilon_and_range(self):
        """FGSM and BIM (more steps than needed, step 0.04) stay within epsilon of the clean image (L-infinity) and
        inside [0, 1]; on standardised crops inside each crop's own min..max (pixel_bounds for smallNORB)."""
        rng = np.random.RandomState(1)
        weights = rng.randn(4, 3)
        unit = rng.rand(16, *IMAGE_SHAPE).astype(np.float32)
        standardised = rng.randn(16, *IMAGE_SHAPE).astype(np.float32)
        labels = rng.randint(0, 3, 16)
        for clean, dataset in ((unit, "mnist"), (standardised, "smallnorb")):
            low, high = attacks.pixel_bounds(dataset, clean)
            for steps, size in ((1, 0.1), (8, 0.04)):
                adversarial, _ = self._perturb(weights, clean, labels, 1.0, 0.1, size, steps, (low, high))
                self.assertLessEqual(np.abs(adversarial - clean).max(), 0.1 + FLOAT_SLACK)
                self.assertTrue(np.all(adversarial >= low[:, None, None, None]))
                self.assertTrue(np.all(adversarial <= high[:, None, None, None]))
            self.assertGreater(np.abs(adversarial - clean).max(), 0.05)  # the attack did move the images

    def test_bim_one_step_of_epsilon_is_fgsm(self):
        """BIM with one step of size epsilon gives FGSM's images exactly, and step_schedule gives both alike."""
        rng = np.random.RandomState(2)
        clean, weights, labels = rng.rand(8, *IMAGE_SHAPE).astype(np.float32), rng.randn(4, 3), rng.randint(0, 3, 8)
        fgsm, _ = self._perturb(weights, clean, labels, 1.0, 0.07)
        bim, _ = self._perturb(weights, clean, labels, 1.0, 0.07, step_size=0.07, steps=1)
        self.assertAllEqual(bim, fgsm)
        options = attacks.Options("bim", (0.07,), "none", 1, 0.07, 10, 1, None)
        self.assertEqual(attacks.step_schedule(options, 0.07), (0.07, 1))
        self.assertEqual(attacks.step_schedule(options._replace(attack="fgsm", bim_steps=10), 0.07), (0.07, 1))
        default = options._replace(bim_steps=10, bim_step_size=None)
        self.assertAllClose(attacks.step_schedule(default, 0.08), (0.01, 10))  # 1.25 * 0.08 / 10

    def test_spread_loss_beyond_the_margin_has_no_gradient(self):
        """An image whose true class beats every other by more than the spread loss's margin has a zero gradient:
        FGSM leaves it as it is and reports it in zero_gradient."""
        clean = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]], np.float32).reshape((2,) + IMAGE_SHAPE)
        adversarial, zero = self._perturb(TWO_CLASS_WEIGHTS, clean, [0, 1], 1.0, 0.1, loss="spread")
        self.assertAllEqual(zero, [True, False])  # logits (1, -1): gap 2 > 0.2; (1.75, -0.5): gap -2.25 < 0.2
        self.assertAllEqual(adversarial[0], clean[0])
        self.assertFalse(np.array_equal(adversarial[1], clean[1]))


def test_success_rate_counts():
    """Untargeted: misclassified among the clean-correct images. Targeted: hits on the target only (a
    misclassification into a third class is no success), over the images whose target is not their label."""
    truth = np.array([0, 1, 2, 3])
    clean = np.array([0, 1, 2, 0])  # 3 correct
    assert attacks.success_rate(truth, clean, np.array([1, 1, 0, 2])) == (pytest.approx(2 / 3), 3)
    targets = np.array([1, 2, 0, 3])  # the last target is its label: left out
    adversarial = np.array([1, 0, 0, 3])  # a hit, a miss into class 0, a hit, (left out)
    assert attacks.success_rate(truth, clean, adversarial, targets) == (pytest.approx(2 / 3), 3)


def test_attack_labels():
    """Untargeted: the labels and +1. Random targets: never the label, the same for the same seed. Least likely:
    the class of lowest clean score. Both targeted forms descend (-1)."""
    labels = np.arange(200) % 10
    assert attacks.attack_labels("none", labels, None, 1)[1] == 1.0
    random_targets, direction = attacks.attack_labels("random", labels, np.zeros((200, 10)), 7)
    assert direction == -1.0 and np.all(random_targets != labels) and len(set(random_targets)) == 10
    assert np.array_equal(random_targets, attacks.attack_labels("random", labels, np.zeros((200, 10)), 7)[0])
    scores = np.array([[0.3, 0.1, 0.6], [0.2, 0.5, 0.05]])
    assert attacks.attack_labels("least_likely", np.array([2, 1]), scores, 1)[0].tolist() == [1, 2]


def test_flag_checks():
    """check_flags accepts the defaults and names the flag of each bad value."""
    good = {"attack": "fgsm", "epsilons": "0,0.1", "attack_target": "none", "bim_steps": 10}
    good.update(bim_step_size=None, attack_images=1000, attack_transfer_from=None, attack_margin=None)
    attacks.check_flags(good)
    assert attacks.parse_epsilons("0.01, 0.3") == (0.01, 0.3)
    for changes, message in (
        ({"epsilons": "0.1,nan"}, "--epsilons must all be finite and >= 0"),
        ({"bim_step_size": 0.0}, "--bim_step_size must be > 0"),
        ({"attack_margin": float("inf")}, "--attack_margin must be > 0, got inf"),
        ({"attack": "none", "attack_transfer_from": "other"}, "--attack_transfer_from needs --attack fgsm or bim"),
    ):
        with pytest.raises(UsageError, match=message):
            attacks.check_flags(dict(good, **changes))


# ---- the command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_trained_run, tiny_trained_cnn, tmp_path_factory):
    """Tiny data, a 2-step capsule run 'caps' and a 2-step CNN run 'cnn' (copies of the session's runs on the
    same tiny data, conftest.py): the workspace."""
    workspace = tmp_path_factory.mktemp("attacks")
    shutil.copytree(tiny_trained_run.data_dir, str(workspace / "data"))
    for name, trained in (("caps", tiny_trained_run), ("cnn", tiny_trained_cnn)):
        shutil.copytree(os.path.join(str(trained.workspace), "run"), str(workspace / name))
    return workspace


def run_main_in_process(args, capsys):
    """main.main(ARGS) in this process (fresh flag values): (exit code, stderr lines)."""
    import main

    main.FLAGS.unparse_flags()
    try:
        code = main.main(["main.py"] + [str(a) for a in args])
    finally:
        main.FLAGS.unparse_flags()  # absl keeps parsed values in the process: later tests parse their own
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attack", "pgd"], "--attack must be one of none/fgsm/bim, got 'pgd'"),
        (["--attack", "fgsm", "--epsilons", "0.1,-0.2"], "--epsilons must all be finite and >= 0"),
        (["--attack", "fgsm", "--epsilons", "0.1;0.2"], "--epsilons must be a comma-separated list of numbers"),
        (["--attack", "bim", "--bim_steps", "0"], "--bim_steps must be >= 1, got 0"),
        (["--attack", "fgsm", "--attack_images", "0"], "--attack_images must be >= 1, got 0"),
        (["--attack", "fgsm", "--attack_margin", "0"], "--attack_margin must be > 0, got 0.0"),
        (["--attack", "fgsm", "--attack_target", "worst"], "--attack_target must be one of none/random/least_likely"),
        (["--attack", "fgsm", "--attack_transfer_from", "nowhere"], "--attack_transfer_from nowhere does not exist"),
        (
            ["--attack", "fgsm", "--attack_transfer_from", "fashion"],
            "--attack_transfer_from fashion is a fashion_mnist",
        ),
    ],
)
def test_bad_attack_flags(runs, monkeypatch, capsys, args, message):
    """Each bad attack flag value is one line on stderr naming it, exit code 2, before any evaluation (a transfer
    run that does not exist, or of another dataset, included)."""
    monkeypatch.chdir(runs)
    if not os.path.exists("fashion"):
        shutil.copytree("cnn", "fashion")
        saved = read_json("fashion/flags.json")
        saved["flags"]["dataset"] = "fashion_mnist"
        with open("fashion/flags.json", "w") as f:
            json.dump(saved, f)
    code, lines = run_main_in_process(["--test", "True", "--result_dir", "caps"] + args, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_bad_attack_flag_in_a_subprocess(runs):
    """The same from the shell: exit code 2 and a single line on stderr."""
    result = subprocess.run(
        [sys.executable, MAIN, "--test", "True", "--result_dir", "caps", "--attack", "pgd"],
        cwd=str(runs),
        env=main_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --attack must be one of none/fgsm/bim, got 'pgd'"
    ], result.stderr


def test_fgsm_then_bim_write_the_attacks_section(runs):
    """`--attack fgsm` adds an `attacks` section (per epsilon: accuracy, success rate, zero gradients; epsilon 0
    keeps the clean accuracy and succeeds nowhere) beside the usual results, and draws attacks.png and
    attack_samples.png; a later `--attack bim --attack_target least_likely --attack_margin 1` joins the same
    section under a key naming its margin, and its loss says the margin."""
    common = ["--test", "True", "--result_dir", "caps", "--eval_batch_size", "6"]
    fgsm = run_main(common + ["--attack", "fgsm", "--epsilons", "0,0.1,0.3", "--attack_images", "12"], cwd=runs)
    assert fgsm.returncode == 0, fgsm.stderr
    assert "attack fgsm/none (spread loss, margin 0.2; 12 images" in fgsm.stdout and "  eps 0.3: " in fgsm.stdout
    results = read_json(str(runs / "caps" / "test_results.json"))
    assert {"accuracy", "confusion_matrix", "attacks"} <= set(results) and results["n"] == 40
    entry = results["attacks"]["fgsm/none"]
    assert [row["epsilon"] for row in entry["per_epsilon"]] == [0.0, 0.1, 0.3] and entry["images"] == 12
    assert entry["per_epsilon"][0]["accuracy"] == entry["clean_accuracy"]
    assert entry["per_epsilon"][0]["success_rate"] == 0.0 and entry["clip"] == "[0, 1]"
    for name in ("attacks.png", "attack_samples.png"):
        assert_png(str(runs / "caps" / name))
    bim_args = ["--attack", "bim", "--attack_target", "least_likely", "--bim_steps", "2", "--epsilons", "0.1"]
    bim = run_main(common + bim_args + ["--attack_images", "6", "--attack_margin", "1"], cwd=runs)
    assert bim.returncode == 0, bim.stderr
    assert "attack bim/least_likely/margin:1 (spread loss, margin 1; 6 images" in bim.stdout
    section = read_json(str(runs / "caps" / "test_results.json"))["attacks"]
    assert sorted(section) == ["bim/least_likely/margin:1", "fgsm/none"]
    assert section["bim/least_likely/margin:1"]["bim_steps"] == 2
    step_size = section["bim/least_likely/margin:1"]["per_epsilon"][0]["step_size"]
    assert step_size == pytest.approx(0.0625)  # 1.25 * 0.1 / 2


def test_transfer_from_the_cnn_and_overlay(runs, tmp_path):
    """`--attack_transfer_from cnn` computes the images on the CNN (cross-entropy) and evaluates them on the
    capsules; compare_attacks.py overlays both runs' curves in one picture."""
    args = ["--test", "True", "--result_dir", "caps", "--attack", "fgsm", "--attack_transfer_from", "cnn"]
    result = run_main(args + ["--epsilons", "0.2", "--attack_images", "6"], cwd=runs)
    assert result.returncode == 0, result.stderr
    entry = read_json(str(runs / "caps" / "test_results.json"))["attacks"]["fgsm/none/from:cnn"]
    assert entry["loss"] == "softmax cross-entropy" and entry["source_checkpoint"].startswith("cnn")
    assert entry["checkpoint"].startswith("caps")
    other = tmp_path / "other"
    other.mkdir()
    rows = [{"epsilon": 0.1, "success_rate": 0.5}, {"epsilon": 0.2, "success_rate": 0.9}]
    with open(str(other / "test_results.json"), "w") as f:
        json.dump({"attacks": {"fgsm/none": {"per_epsilon": rows}}}, f)
    out = str(tmp_path / "compared.png")
    curves = len(read_json(str(runs / "caps" / "test_results.json"))["attacks"]) + 1
    assert compare_attacks.compare([str(runs / "caps"), str(other)], out) == curves
    assert_png(out)
    with open(str(other / "test_results.json"), "w") as f:
        json.dump({"accuracy": 0.5}, f)  # test mode without --attack
    with pytest.raises(compare_attacks.UsageError, match="holds no attack results"):
        compare_attacks.compare([str(other)], out)
