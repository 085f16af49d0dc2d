"""Make the pytorch-fid fixtures that tests/test_fid.py and chapter 12a check the FID Inception by.

    pip download --no-deps pytorch-fid==0.3.0 torchvision==0.29.1 -d WHEELS
    unzip WHEELS/pytorch_fid-0.3.0-py3-none-any.whl -d WHEELS/pytorch_fid
    unzip WHEELS/torchvision-0.29.1-*.whl -d WHEELS/torchvision
    PYTHONPATH=$PWD python tests/data/make_pytorch_fid_fixtures.py WHEELS/torchvision \
        WHEELS/pytorch_fid

writes, next to this script,
- pytorch_fid_inception_keys.txt: the name and shape of every tensor in the state dict of
  pytorch-fid's `fid_inception_v3()` (torchvision's `Inception3` with pytorch-fid's
  `FIDInceptionA/C/E_1/E_2` blocks), the network pytorch-fid loads
  `pt_inception-2015-12-05-6726825d.pth` into, strictly: so these are that file's keys;
- pytorch_fid_features.npy: the 2048 features that pytorch-fid's `InceptionV3([3])` (resizing to
  299, scaling to [-1, 1]) gives two 3x32x32 images (NumPy's PCG64, seed 1000, uniform in
  [0, 1]) when every tensor of its state dict is filled by `hvae_nb.fid.seeded_weights` (handed
  to pytorch-fid in place of the downloaded file).

Nothing of pytorch-fid or torchvision is copied: both are imported from the unpacked wheels.
torchvision's compiled operators do not load beside every torch build, and the network needs none
of them, so the packages `torchvision` and `torchvision.models` are made empty shells whose
__path__ points into the wheel: only the pure-Python modules the network needs run.
"""
import sys, types
from pathlib import Path

import numpy as np
import torch

from hvae_nb.fid import seeded_weights

HERE = Path(__file__).resolve().parent


def import_pytorch_fid(torchvision_dir: Path, pytorch_fid_dir: Path):
    "pytorch_fid.inception, with torchvision.models.inception imported from the unpacked wheel."
    for name, folder in (('torchvision', torchvision_dir / 'torchvision'),
                         ('torchvision.models', torchvision_dir / 'torchvision' / 'models')):
        shell = types.ModuleType(name)
        shell.__path__ = [str(folder)]
        sys.modules[name] = shell
    sys.modules['torchvision'].models = sys.modules['torchvision.models']
    # pytorch-fid reads the version to pick the arguments it passes to torchvision
    sys.modules['torchvision'].__version__ = '0.29.1'
    import torchvision.models.inception as inception
    sys.modules['torchvision.models'].inception = inception
    sys.modules['torchvision.models'].inception_v3 = inception.inception_v3
    sys.path.insert(0, str(pytorch_fid_dir))
    import pytorch_fid.inception
    return pytorch_fid.inception, inception.Inception3


def main(torchvision_dir: str, pytorch_fid_dir: str):
    pytorch_fid, Inception3 = import_pytorch_fid(Path(torchvision_dir), Path(pytorch_fid_dir))
    shapes = {}
    # the names and shapes: fid_inception_v3() as built, just before it loads the downloaded weights
    strict_load = Inception3.load_state_dict
    Inception3.load_state_dict = lambda self, state, *args, **kwargs: shapes.update(
        {k: tuple(v.shape) for k, v in self.state_dict().items()})
    pytorch_fid.load_state_dict_from_url = lambda *args, **kwargs: None
    pytorch_fid.fid_inception_v3()
    # the features: the seeded weights in place of the download, loaded by pytorch-fid's strict load
    Inception3.load_state_dict = strict_load
    pytorch_fid.load_state_dict_from_url = lambda *args, **kwargs: seeded_weights(shapes)
    network = pytorch_fid.InceptionV3([3]).eval()
    images = np.random.default_rng(1000).uniform(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad(): features = network(torch.from_numpy(images))[0].flatten(1)
    lines = ["# pytorch-fid 0.3.0 fid_inception_v3(): name, shape of every state-dict tensor",
             "# (the keys of pt_inception-2015-12-05-6726825d.pth; '-': a scalar), made by",
             "# make_pytorch_fid_fixtures.py"]
    lines += [f"{name} {','.join(map(str, shape)) or '-'}" for name, shape in shapes.items()]
    (HERE / 'pytorch_fid_inception_keys.txt').write_text('\n'.join(lines) + '\n')
    np.save(HERE / 'pytorch_fid_features.npy', features.numpy())
    largest = features.abs().max()
    print(f"{len(shapes)} names; features {tuple(features.shape)}, largest {largest:.3f}")


if __name__ == '__main__':
    main(*sys.argv[1:])
