"""Exit codes and one-line messages for every failure class (the table in errors' docstring)."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kuberl_runtime.contract import (
    EXIT_CONFIG_ERROR,
    EXIT_DATA_ERROR,
    EXIT_OUT_OF_MEMORY,
    EXIT_PEER_LOST,
    NON_RETRYABLE_EXIT_CODES,
)
from kuberl_runtime.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    MAX_MESSAGE,
    ConfigError,
    DataError,
    PeerLost,
    RuntimeFailure,
    check_finite,
    describe,
    exit_code_for,
    write_termination_message,
)


def raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    """`outer` as Python leaves it after `raise outer from inner`."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


def dist_error(name: str, message: str) -> BaseException:
    return getattr(torch.distributed, name)(message)


NCCL_WATCHDOG = ("[PG ID 1 PG GUID 1 Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, "
                 "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600081 milliseconds before "
                 "timing out.")
NCCL_REMOTE = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:268, remote process exited or there "
               "was a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network "
               "error or a remote process exiting prematurely.\nLast error:\nsocketProgress: Connection closed by "
               "remote peer trainer-1.job.ns.svc<52824>")

CASES = [
    # (exception, exit code, words the one-line message must contain)
    (ConfigError("prompt file has no column 'question'", field="runtime.data.promptKey"), EXIT_CONFIG_ERROR,
     ["ConfigError", "no column 'question'", "change runtime.data.promptKey"]),
    (ConfigError("model path /models/x does not exist", field="runtime.model.path"), EXIT_CONFIG_ERROR,
     ["/models/x", "runtime.model.path"]),
    (DataError("train/policy_loss is nan (not finite)", field="runtime.training.lr"), EXIT_DATA_ERROR,
     ["DataError", "nan", "runtime.training.lr"]),
    (PeerLost("rendezvous timed out after 600 s", role="rollout", rank=1), EXIT_PEER_LOST,
     ["PeerLost", "rendezvous timed out", "rollout rank 1"]),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines"), EXIT_OUT_OF_MEMORY,
     ["out of memory", "Tried to allocate 2.00 GiB", "training.microBatchSize"]),
    (MemoryError(), EXIT_OUT_OF_MEMORY, ["out of memory", "MemoryError", "training.microBatchSize"]),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
     EXIT_OUT_OF_MEMORY, ["out of memory", "training.gradientCheckpointing"]),
    (raised_from(RuntimeError("generation failed"), torch.OutOfMemoryError("CUDA out of memory")),
     EXIT_OUT_OF_MEMORY, ["out of memory", "CUDA out of memory"]),
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer "
                  "[127.0.0.1]:1452"), EXIT_PEER_LOST, ["lost a peer", "Connection closed by peer"]),
    (dist_error("DistBackendError", "NCCL communicator was aborted on rank 3"), EXIT_PEER_LOST,
     ["lost a peer", "DistBackendError", "rank 3"]),
    (dist_error("DistStoreError", "wait timeout after 600000ms, keys: /barrier"), EXIT_PEER_LOST,
     ["DistStoreError", "wait timeout"]),
    (dist_error("DistNetworkError", "failed to connect to trainer-0.job.ns.svc:29500"), EXIT_PEER_LOST,
     ["DistNetworkError", "trainer-0.job.ns.svc:29500"]),
    # Collective timeouts and lost NCCL peers, with the texts of torch's and gloo's sources (gloo's are also
    # produced for real in tests/integration/test_rendezvous.py). ProcessGroupNCCL's watchdog
    # (WorkNCCL::checkTimeout) raises DistBackendError; torch releases before it, std::runtime_error.
    (dist_error("DistBackendError", NCCL_WATCHDOG), EXIT_PEER_LOST,
     ["lost a peer", "Watchdog caught collective operation timeout", "raise KUBERL_COLLECTIVE_TIMEOUT"]),
    (RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=668, OpType=ALLREDUCE, "
                  "Timeout(ms)=600000) ran for 600097 milliseconds before timing out."), EXIT_PEER_LOST,
     ["RuntimeError", "OpType=ALLREDUCE", "raise KUBERL_COLLECTIVE_TIMEOUT"]),
    # What the next collective of that group raises (NCCLComm::getNcclComm), naming the original reason.
    (dist_error("DistBackendError", f"NCCL communicator was aborted on rank 1.  Original reason for failure was: "
                                    f"{NCCL_WATCHDOG}"), EXIT_PEER_LOST,
     ["DistBackendError", "aborted on rank 1", "raise KUBERL_COLLECTIVE_TIMEOUT"]),
    # C10D_NCCL_CHECK on ncclRemoteError: DistBackendError now, RuntimeError in older torch.
    (dist_error("DistBackendError", NCCL_REMOTE), EXIT_PEER_LOST, ["lost a peer", "remote process exited"]),
    (RuntimeError(NCCL_REMOTE), EXIT_PEER_LOST, ["lost a peer", "remote process exited"]),
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:133] Timed out waiting 1800000ms "
                  "for send operation to complete"), EXIT_PEER_LOST, ["1800000ms", "raise KUBERL_COLLECTIVE_TIMEOUT"]),
    (raised_from(PeerLost("weight sync of version 4 failed: Application timeout caused pair closure", role="rollout",
                          rank=0), RuntimeError("Application timeout caused pair closure")), EXIT_PEER_LOST,
     ["PeerLost: weight sync of version 4 failed", "rollout rank 0"]),
    # A timeout that is not a collective's stays what it is.
    (RuntimeError("Timed out waiting for the reward function"), EXIT_FAILURE, ["RuntimeError: Timed out waiting"]),
    # The runtime's own diagnosis wins over what it wraps.
    (raised_from(ConfigError("reward function math_reward raised", field="runtime.reward.function"),
                 MemoryError()), EXIT_CONFIG_ERROR, ["reward function math_reward raised", "runtime.reward.function"]),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, ["interrupted"]),
    (ValueError("invalid literal for int()\nwith base 10"), EXIT_FAILURE, ["ValueError", "invalid literal"]),
    (RuntimeFailure("something the runtime noticed"), EXIT_FAILURE, ["something the runtime noticed"]),
    (RuntimeError(), EXIT_FAILURE, ["RuntimeError"]),
]


@pytest.mark.parametrize(("exc", "code", "words"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(CASES)])
def test_exit_code_and_one_line_message(exc: BaseException, code: int, words: list[str]):
    assert exit_code_for(exc) == code
    message = describe(exc)
    assert "\n" not in message and message == message.strip()
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("exc", "retried"),
    [(ConfigError("x"), False), (DataError("x"), False), (MemoryError(), True), (PeerLost("x"), True),
     (ValueError("x"), True)],
)
def test_only_config_and_data_errors_are_final_for_the_operator(exc: BaseException, retried: bool):
    assert (exit_code_for(exc) not in NON_RETRYABLE_EXIT_CODES) is retried


def test_long_messages_are_cut_to_one_bounded_line():
    message = describe(ConfigError("word " * 500, field="runtime.data.path"))
    assert len(message) == MAX_MESSAGE and message.endswith("...") and "\n" not in message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_finite_raises_a_data_error_naming_metric_and_field(value: float):
    with pytest.raises(DataError) as err:
        check_finite("train/policy_loss", value, field="runtime.training.lr")
    assert "train/policy_loss" in str(err.value) and "runtime.training.lr" in str(err.value)
    assert exit_code_for(err.value) == EXIT_DATA_ERROR


def test_check_finite_accepts_finite_numbers():
    check_finite("train/policy_loss", 0.0, field="runtime.training.lr")
    check_finite("train/policy_loss", -1e30, field="runtime.training.lr")


def test_termination_message_is_written_only_where_kubernetes_created_the_file(tmp_path: Path):
    log = tmp_path / "termination-log"
    assert write_termination_message("ConfigError: x", path=str(log)) is False
    assert not log.exists()
    log.touch()
    assert write_termination_message("ConfigError: x", path=str(log)) is True
    assert log.read_text() == "ConfigError: x\n"


def _lose_a_peer(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    dist.barrier()
    if rank == 1:
        os._exit(0)  # vanishes without a word, as a killed pod does
    try:
        for _ in range(100):
            dist.all_reduce(torch.ones(3))
    except BaseException as e:  # noqa: BLE001 (what gloo raises is the point of the test)
        Path(out).write_text(f"{exit_code_for(e)}\n{describe(e)}")
    finally:
        # As the runtime does (Groups.close in every entry point's finally): a group left to the
        # interpreter's exit lets gloo's worker thread free the failed all_reduce (its tensors need the
        # GIL) while Python finalizes, and the process aborts (SIGABRT, "terminate called without an
        # active exception") instead of exiting with its code; on a loaded machine, often.
        dist.destroy_process_group()


@pytest.mark.integration  # a real two-process gloo group
@pytest.mark.timeout(120)
def test_a_peer_vanishing_from_a_real_gloo_group_is_peer_lost(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.txt"
    mp.spawn(_lose_a_peer, args=(port, str(out)), nprocs=2, join=True)
    code, message = out.read_text().split("\n", 1)
    assert int(code) == EXIT_PEER_LOST
    assert message.startswith("lost a peer process")
