"""The SpeechBrain internals the toolkit overrides (docs/speechbrain.md): fail loudly when an upgrade changes them."""

import inspect

import speechbrain as sb
from speechbrain.utils.checkpoints import Checkpointer

PINNED = "1.1.2"


def test_pinned_speechbrain_version():
    assert sb.__version__ == PINNED, (
        f"speechbrain {sb.__version__} is installed but the overrides in docs/speechbrain.md were written against "
        f"{PINNED}: re-check them, then update PINNED"
    )


def test_overridden_brain_methods_keep_their_signatures():
    assert str(inspect.signature(sb.Brain._wrap_distributed)) == "(self)"
    assert list(inspect.signature(sb.Brain.fit).parameters)[:3] == ["self", "epoch_counter", "train_set"]
    assert "SyncBatchNorm" in inspect.getsource(sb.Brain._wrap_distributed)


def test_multi_process_checkpoint_and_optimizer_hooks_exist():
    from speechbrain.utils.checkpoints import register_checkpoint_hooks

    assert "save_on_main_only" in inspect.signature(register_checkpoint_hooks).parameters
    # Savers run on every process (the sharded head's gather needs all of them), after the folder is broadcast.
    source = inspect.getsource(Checkpointer.save_checkpoint)
    assert "ddp_broadcast(ckpt_dir" in source and "for name, obj in self.recoverables.items()" in source
    assert "self.optimizers_dict = {" in inspect.getsource(sb.Brain.init_optimizers)
    assert "self.optimizers_dict" in inspect.getsource(sb.Brain.optimizers_step)


def test_overridden_checkpointer_methods_keep_their_signatures_and_calls():
    assert list(inspect.signature(Checkpointer.save_checkpoint).parameters) == [
        "self",
        "meta",
        "end_of_epoch",
        "name",
        "verbosity",
    ]
    assert list(inspect.signature(Checkpointer._custom_checkpoint_dirpath).parameters) == ["self", "name"]
    assert list(inspect.signature(Checkpointer._new_checkpoint_dirpath).parameters) == ["self"]
    # The atomic save relies on save_checkpoint naming a given folder through _custom_checkpoint_dirpath.
    assert "_custom_checkpoint_dirpath(name)" in inspect.getsource(Checkpointer.save_checkpoint)


def test_speaker_recognition_decides_with_greater_than_and_takes_a_threshold():
    from speechbrain.inference.speaker import SpeakerRecognition

    # The model card's thresholds (qmargin_spk.inference.decisions) assume `score > threshold` in verify_batch.
    assert "threshold" in inspect.signature(SpeakerRecognition.verify_batch).parameters
    assert "return score, score > threshold" in inspect.getsource(SpeakerRecognition.verify_batch)
