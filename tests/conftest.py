import pytest

import slurm_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real two-node SLURM cluster on this machine (tests/slurm_cluster.py), started on first use
    and stopped at the end of the session; SLURM commands run in the tests use it (SLURM_CONF)."""
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    with pytest.MonkeyPatch.context() as patch:
        try:
            cluster.start()
            patch.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
        finally:
            cluster.stop()
