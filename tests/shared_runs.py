"""The tiny trained run that tests/test_evaluate.py, tests/test_errors.py and tests/test_train.py share (the fixture
`tiny_run` in tests/conftest.py trains it once per pytest-xdist worker).

One recipe serves every test that reads it:
- 200 steps: enough for the evaluation tests to beat independent pixels (an untrained model sits at the coin flips'
  44 nats, and 30 steps only reach the independent pixels' 27);
- EMA on (decay 0.9): the evaluation reports which weights it scored;
- a cosine schedule (vae_digits' own, as every recipe's), which a test extends past the run's end;
- every step logged (`log_every=1`): the extension test checks the learning rate of each step;
- a checkpoint every 100 steps, the last one at the end: the resume and corrupt-checkpoint tests use it.
A test that writes into the run works on a copy (`shutil.copytree`); the fixture checks at the end of the session
that nothing in the shared directory changed."""
from pathlib import Path

TINY_RUN_PRESET = 'vae_digits'
TINY_RUN_STEPS = 200
TINY_RUN_EMA_DECAY = 0.9
TINY_RUN_OVERRIDES = {
    'max_steps': str(TINY_RUN_STEPS), 'ema_decay': str(TINY_RUN_EMA_DECAY), 'log_every': '1',
    'eval_every': '100', 'save_every': '100', 'eval_examples': '50', 'eval_samples': '5', 'final_eval_samples': '5'}


def train_tiny_run(folder: Path) -> Path:
    "Train the shared recipe into `folder` (in this process: starting Python and PyTorch again costs seconds)."
    from hvae_nb.configs import apply_overrides
    from hvae_nb.presets import get_preset
    from hvae_nb.train import train
    train(apply_overrides(get_preset(TINY_RUN_PRESET), TINY_RUN_OVERRIDES), out=folder, progress=False)
    return folder


def snapshot(folder: Path) -> dict:
    "Every file and folder under `folder`, with its size and modification time."
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob('*')}
