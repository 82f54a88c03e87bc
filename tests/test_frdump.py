"""emu.debug.frdump: the emulator's records as flight-recorder dumps, read by PyTorch's own analyzer (fr_trace)
run as a user runs it, on hand-built records of a 4-rank job."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from emu.debug.frdump import FR_VERSION, write_dumps

GROUP, RANKS = "emu_hccl_0", [0, 1, 2, 3]
TABULATE_WARNING = "tabulate is not installed. Proceeding without it."


def _record(seq: int, op: str, completed: bool = True) -> dict:
    """One record of group GROUP: dispatch / combine of 8 tokens of 16 (to 40 / from 40 rows), all_reduce of 8x16."""
    shapes, out = {"dispatch": ([[8, 16], [8, 2]], [[40, 16]]), "combine": ([[40, 16]], [[8, 16]])}.get(
        op, ([[8, 16]], [[8, 16]]))
    t0 = 1_000_000 * seq
    return {"group": GROUP, "group_ranks": RANKS, "seq": seq, "op": op, "shapes": shapes,
            "dtypes": ["bfloat16"] * len(shapes), "out_shapes": out, "site": f"model.py:{40 + seq}",
            "t0": t0, "t1": t0 + 5000 if completed else None, "peer": None}


def _analyze(directory: str, *flags: str, prefix: str = "rank") -> tuple[int, list[str], str]:
    """Run the analyzer as a user would: its return code, the lines it printed (it logs to stderr) and a
    report of the command and both streams for assertion messages."""
    cmd = [sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", directory, "-p", prefix, *flags]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=50)
    report = f"$ {' '.join(cmd)}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    return done.returncode, (done.stdout + done.stderr).splitlines(), report


@pytest.mark.timeout(60)
def test_layout(tmp_path):
    records = {r: [_record(1, "dispatch"), _record(2, "all_reduce", completed=False)] for r in RANKS}
    paths = write_dumps(str(tmp_path), records)
    assert paths == [os.path.join(str(tmp_path), f"rank{r}") for r in RANKS]
    with open(paths[2], "rb") as f:
        dump = pickle.load(f)
    assert dump["version"] == FR_VERSION == "2.10"
    assert dump["pg_config"] == {GROUP: {"name": GROUP, "desc": "undefined", "ranks": "[0, 1, 2, 3]"}}
    assert dump["pg_status"] == {"0": {"last_enqueued_collective": 2, "last_started_collective": 2,
                                       "last_completed_collective": 1}}
    first, second = dump["entries"]
    assert first["profiling_name"] == "hccl:all_to_all dispatch" and first["state"] == "completed"
    assert first["output_sizes"] == first["input_sizes"] == [[8, 16], [8, 2]]
    assert first["emu_output_sizes"] == [[40, 16]]
    assert first["frames"] == [{"name": "dispatch", "filename": "model.py", "line": 41}]
    assert (second["record_id"], second["collective_seq_id"], second["state"]) == (1, 2, "started")
    with pytest.raises(ValueError, match="already holds"):
        write_dumps(str(tmp_path), {r: records[r] for r in RANKS[:2]})  # rank2, rank3 would be stale


@pytest.mark.timeout(60)
def test_consistent_job_reports_nothing(tmp_path):
    records = {r: [_record(1, "dispatch"), _record(2, "all_reduce"), _record(3, "combine")] for r in RANKS}
    write_dumps(str(tmp_path / "dumps"), records)
    db_path = str(tmp_path / "db.pkl")
    rc, lines, out = _analyze(str(tmp_path / "dumps"), "-o", db_path)
    assert rc == 0, out
    # the analyzer prints nothing when every collective matched
    assert [line for line in lines if line.strip() and line != TABULATE_WARNING] == [], out
    with open(db_path, "rb") as f:
        _, db = pickle.load(f)
    assert [(c.collective_name, c.collective_seq_id, c.pass_check, c.missing_ranks) for c in db.collectives] == [
        ("hccl:all_to_all dispatch", 1, True, None), ("hccl:all_reduce", 2, True, None),
        ("hccl:all_to_all combine", 3, True, None)], out
    assert len(db.ncclcalls) == 12, out


@pytest.mark.timeout(60)
def test_missing_rank_is_named(tmp_path):
    records = {r: [_record(1, "dispatch"), _record(2, "all_reduce"), _record(3, "combine", completed=False)]
               for r in RANKS}
    records[1] = records[1][:2]  # rank 1 never issues its 3rd collective
    write_dumps(str(tmp_path), records)
    rc, lines, out = _analyze(str(tmp_path))
    assert rc == 0, out
    for line in ["Not all ranks joining collective, sequence number: 3", "group info: emu_hccl_0",
                 "collective: hccl:all_to_all combine", "missing ranks: {1}", "expected ranks: {0, 1, 2, 3}",
                 "collective state: started", " combine at model.py:43"]:
        assert line in lines, f"{line!r} not printed\n{out}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prefix", ["rank", "emu_rank"])  # two listing orders (on ext4 one puts rank 1 first)
def test_mismatched_collective_is_named(tmp_path, prefix):
    records = {r: [_record(1, "dispatch"), _record(2, "all_reduce"),
                   _record(3, "all_reduce" if r == 1 else "dispatch", completed=False)] for r in RANKS}
    write_dumps(str(tmp_path), records, prefix=prefix)
    rc, lines, out = _analyze(str(tmp_path), prefix=prefix)
    assert rc == 0, out
    assert "Collective sequence number: 3 has errors" in lines, out
    # The analyzer takes the rank whose dump it lists first (os.walk order) as the reference and blames the
    # ranks that differ from it: rank 1 if the reference called dispatch, else the three dispatching ranks.
    reference = int(next(f for f in os.listdir(tmp_path) if f.startswith(prefix))[len(prefix):])
    if reference == 1:
        culprits, expected, found, collective = [0, 2, 3], "all_reduce", "all_to_all", "hccl:all_reduce"
    else:
        culprits, expected, found, collective = [1], "all_to_all", "all_reduce", "hccl:all_to_all dispatch"
    assert f"collective: {collective}" in lines, out
    error_line = next((line for line in lines if line.startswith("error msg: ")), "")
    errors = sorted(error_line.removeprefix("error msg: Culprit rank ").split(", Culprit rank "))
    assert errors == [f"{rank}; Error type: COLLECTIVE_TYPE_MISMATCH, Expected collective type: '{expected}' "
                      f"does not match found collective type: '{found}'" for rank in culprits], out
