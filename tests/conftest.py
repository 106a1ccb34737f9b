import os

# Eight fake CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A prepared store of 12 synthetic subjects at 6 mm (10 training, 2 test), built once per session:
    the training-loop tests share it (see tests/_tiny.py for the matching config)."""
    from jaxseg.data.prepare import prepare
    from jaxseg.config import SynthConfig
    from jaxseg.data.synth import write_cohort

    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root / "raw", SynthConfig(n_subjects=12, seed=3, spacing=6.0, n_test=2), workers=1, progress=False,
                 preview=False)
    prepare(root / "raw", root / "store", num_workers=1, progress=False)
    return root / "store"
