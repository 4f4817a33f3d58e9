"""The rendezvous each task derives from SLURM."""
import pytest

from launchers.rendezvous import master_port, rendezvous_env


def test_rendezvous_env():
    env = rendezvous_env(4321, ["node3", "node4"], global_rank=5, num_tasks=8, local_rank=1, num_nodes=2)
    assert env == {"MASTER_ADDR": "node3", "MASTER_PORT": "24321", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                   "LOCAL_WORLD_SIZE": "4"}


def test_ports_differ_between_neighbouring_jobs_and_stay_below_ephemeral_ports():
    ports = {master_port(j) for j in range(10_000, 10_100)}
    assert len(ports) == 100 and all(20_000 <= p < 30_000 for p in ports)
    assert master_port(123_456_789) < 32_768


def test_uneven_tasks_are_refused():
    with pytest.raises(RuntimeError, match="same number of tasks per node"):
        rendezvous_env(1, ["a", "b"], 0, 3, 0, 2)
