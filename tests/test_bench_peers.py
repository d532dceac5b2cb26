"""kvd.bench.peers without servers (CI never builds llama.cpp): llama-server's command line and
request fields, the F32 copy made once, the skip when the binaries are missing, and the tables
and targets taken from the rounds' ratios."""

import stat
from pathlib import Path

import pytest

from kvd.bench.peers import (
    KVD_F32,
    KVD_GGUF,
    LLAMA_F32,
    LLAMA_GGUF,
    SAMPLED_STREAMS,
    SINGLE,
    STREAMS,
    VLLM,
    LlamaBuild,
    bandwidth_line,
    cpu_line,
    f32_copy,
    goal_lines,
    llama_fields,
    llama_server_argv,
    parse,
    ratio_table,
    same_line,
    sections,
    settle_line,
    slot_context,
    speed_table,
)
from kvd.bench.serve import FULL, QUICK, DaemonError, ModeResult
from kvd.bench.serve_http import GREEDY, MODEL_NAME, SAMPLED, CpuUse


def test_llama_server_argv():
    argv = llama_server_argv(Path("bin/llama-server"), Path("m.gguf"), 8123, threads=2, slots=32, ctx_per_slot=512)
    opts = dict(zip(argv[1::2], argv[2::2]))
    assert argv[0] == "bin/llama-server"
    assert opts["-m"] == "m.gguf" and opts["--port"] == "8123" and opts["--host"] == "127.0.0.1"
    assert opts["-t"] == opts["-tb"] == "2"  # the same threads as kvd and vLLM, in decode and prefill
    assert opts["-np"] == "32" and opts["-c"] == str(32 * 512)  # 32 streams, 512 tokens of KV each
    assert opts["--alias"] == MODEL_NAME
    assert {"--no-cache-prompt", "--no-kv-unified", "--cont-batching"} <= set(argv)
    assert argv[argv.index("--cache-ram") + 1] == "0"  # no prompt cache in RAM either: prefix caching off


def test_llama_fields_sample_what_the_others_sample():
    assert llama_fields(GREEDY) == GREEDY  # the argmax, whatever its top_k and min_p
    fields = llama_fields(SAMPLED)
    assert fields == SAMPLED | {"top_k": 0, "min_p": 0.0}  # its defaults (40, 0.05) undone
    assert SAMPLED == {"temperature": 0.8, "top_p": 0.95}  # the shared dict is left as it was


def test_slot_context_and_sections():
    assert slot_context(([[1] * 300, [1] * 40], [128, 16]), ([[1] * 32], [128])) == 512
    assert slot_context(([[1] * 100], [28])) == 256
    single = ([[1] * 32], [128])
    work = ([[1] * 50] * 64, [20] * 64)
    secs = sections(FULL, single, work, rounds=3, single_rounds=6)
    assert [s.name for s in secs] == [SINGLE, STREAMS, SAMPLED_STREAMS]
    assert [(s.limit, s.rounds) for s in secs] == [(1, 6), (32, 3), (32, 3)]
    assert [s.sampling for s in secs] == [GREEDY, GREEDY, SAMPLED]
    assert secs[0].spec == ("single stream", "single", [0.0], 1)
    assert secs[2].spec[1:] == ("sampled-32", [0.0] * 64, 32) and secs[2].title.startswith("32 streams sampled")
    assert sections(QUICK, single, work, 1, 2)[1].limit == QUICK.concurrency


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_binaries_are_one_line_pointing_at_make_bench_llama(tmp_path):
    build = LlamaBuild(tmp_path / "llama.cpp-1")
    why = build.missing()
    assert "\n" not in why and "llama-server and llama-quantize" in why and "`make bench-llama`" in why
    build.server.parent.mkdir(parents=True)
    executable(build.server, "")
    assert "llama-quantize not built" in build.missing()
    executable(build.quantize, "")
    assert build.missing() is None


def test_the_f32_copy_is_made_once(tmp_path):
    calls = tmp_path / "calls"
    # a stand-in for llama-quantize: --allow-requantize IN OUT F32 -> copies IN to OUT
    quantize = executable(tmp_path / "quantize", f'#!/bin/sh\necho "$@" >> {calls}\ncp "$2" "$3"\n')
    gguf = tmp_path / "model-q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    out = f32_copy(quantize, gguf, tmp_path)
    assert out == tmp_path / "model-q4_1-F32.gguf" and out.read_bytes() == b"GGUF"
    assert f32_copy(quantize, gguf, tmp_path) == out
    assert calls.read_text().split("\n")[:-1] == [f"--allow-requantize {gguf} {out.with_suffix('.tmp')} F32"]

    failing = executable(tmp_path / "failing", "#!/bin/sh\necho 'cannot requantize' >&2\nexit 3\n")
    build = LlamaBuild(tmp_path / "llama.cpp-1")
    build.quantize.parent.mkdir(parents=True)
    executable(build.quantize, quantize.read_text())
    assert build.models(gguf) == {LLAMA_GGUF: gguf, LLAMA_F32: out}  # beside the build: the copy above

    with pytest.raises(DaemonError, match="cannot requantize"):
        f32_copy(failing, tmp_path / "other.gguf", tmp_path)
    assert not (tmp_path / "other-F32.gguf").exists()


def runs(*tok_s: float) -> list[ModeResult]:
    return [ModeResult("x", 100 / r, 100, [[0] * 100]) for r in tok_s]


def fake_results() -> dict[str, dict[str, list[ModeResult]]]:
    """Rounds of every server in each section; llama.cpp slower in single, faster in streams."""
    return {
        SINGLE: {KVD_GGUF: runs(100, 90, 110), KVD_F32: runs(50, 45, 55), VLLM: runs(40, 40, 40),
                 LLAMA_GGUF: runs(80, 100, 100), LLAMA_F32: runs(50, 50, 50)},
        STREAMS: {KVD_GGUF: runs(300, 300, 300), KVD_F32: runs(280, 280, 280), VLLM: runs(250, 200, 300),
                  LLAMA_GGUF: runs(150, 300, 100), LLAMA_F32: runs(140, 140, 140)},
        SAMPLED_STREAMS: {KVD_GGUF: runs(200, 200, 200), KVD_F32: runs(190, 190, 190), VLLM: runs(180, 180, 180),
                          LLAMA_GGUF: runs(100, 100, 100), LLAMA_F32: runs(90, 90, 90)},
    }  # fmt: skip


def test_ratios_are_taken_within_each_round_then_the_median():
    secs = sections(FULL, ([[1]], [1]), ([[1]], [1]), 3, 3)
    table = ratio_table(fake_results(), secs).splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == [
        f"| {KVD_GGUF} / {LLAMA_GGUF}", f"| {KVD_GGUF} / {VLLM}", f"| {KVD_F32} / {LLAMA_F32}", f"| {KVD_F32} / {VLLM}"]
    gguf_llama = table[2].split(" | ")
    # single: 100/80, 90/100, 110/100 -> median 1.10 (a median of the totals' ratio would be 1.0)
    assert gguf_llama[1] == "**1.10** (1.25, 0.90, 1.10)"
    assert gguf_llama[2] == "**2.00** (2.00, 1.00, 3.00)"
    assert "**1.20** (1.20, 1.50, 1.00)" in table[3]  # kvd GGUF / vLLM, 32 streams

    speeds = speed_table(fake_results(), secs).splitlines()
    assert speeds[0] == ("| server | single stream tok/s | 32 streams tok/s | 32 streams sampled (T 0.8, top_p 0.95) "
                         "tok/s |")  # fmt: skip
    assert speeds[2] == f"| {KVD_GGUF} | 100.0 | 300.0 | 200.0 |"  # each server's median round
    assert speeds[4] == f"| {VLLM} | 40.0 | 250.0 | 180.0 |"

    same = same_line(fake_results(), "32 streams")
    assert same.startswith("greedy outputs identical at 32 streams, first round: kvd float32 / vllm serve float32 1/1;")

    goals = goal_lines(fake_results(), secs)
    assert len(goals) == 4
    assert goals[0].startswith(f"**single stream: {KVD_GGUF} / {LLAMA_GGUF}: 1.100**")
    assert "target ≥ 1.0, stretch 1.3: met" in goals[0]
    assert "target ≥ 1.5: met" in goals[1]  # streams: kvd GGUF / llama.cpp GGUF 2.0
    assert "target ≥ 1.3: NOT met" in goals[2]  # streams: kvd GGUF / vLLM 1.2
    assert "target ≥ 1.0: met" in goals[3]  # single: kvd float32 / llama.cpp F32 1.0


def test_bandwidth_against_copy_and_read(monkeypatch):
    import kvd.bench.peers as peers

    monkeypatch.setattr(peers, "weight_bytes", lambda path: {"q.gguf": 100_000_000, "f.gguf": 500_000_000}[path.name])
    line = bandwidth_line(fake_results(), {KVD_GGUF: Path("q.gguf"), LLAMA_F32: Path("f.gguf")}, 50.0, 40.0)
    # the median single-stream round x the file's tensor bytes: 100 tok/s x 100 MB, 50 tok/s x 500 MB
    assert f"{KVD_GGUF} 10.0 GB/s (20%; 25% of read)" in line
    assert f"{LLAMA_F32} 25.0 GB/s (50%; 62% of read)" in line
    assert "copy bandwidth 50.0 GB/s" in line and "read bandwidth 40.0 GB/s" in line


def test_without_a_peer_its_rows_go():
    results = {s: {k: v for k, v in by.items() if not k.startswith("llama")} for s, by in fake_results().items()}
    secs = sections(FULL, ([[1]], [1]), ([[1]], [1]), 3, 3)
    table = ratio_table(results, secs)
    assert "llama" not in table and f"{KVD_F32} / {VLLM}" in table
    assert len(goal_lines(results, secs)) == 1  # only kvd GGUF / vLLM at 32 streams remains
    alone = {s: {k: v for k, v in by.items() if k.startswith("kvd")} for s, by in fake_results().items()}
    assert ratio_table(alone, secs) == "No ratios: no peer ran."
    assert "llama-server" not in speed_table(alone, secs)


def test_flags():
    a = parse([])
    assert (a.rounds, a.quick, a.no_vllm, a.llama_dir) == (3, False, False, Path(".peers/llama.cpp-11434.0.0"))
    assert parse(["--quick"]).rounds == 1
    with pytest.raises(SystemExit):
        parse(["--rounds", "0"])


def test_the_makefile_passes_its_llama_dir():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    version = next(line.split(":=")[1].strip() for line in makefile.splitlines() if line.startswith("LLAMA_VERSION"))
    assert parse([]).llama_dir == Path(f".peers/llama.cpp-{version}")
    assert "$(PY) -m kvd.bench.peers --llama-dir $(LLAMA_DIR)" in makefile


def test_cpu_and_settle_lines():
    uses = {KVD_GGUF: [CpuUse(1.0, 2.0, 0.5, 1000, 0.1), CpuUse(1.0, 4.0, 0.5, 1000, 0.2)],
            VLLM: [CpuUse(2.0, 2.0, 0.5, 1000, 3.5), CpuUse(2.0, 2.0, 0.5, 1000, 1.0)]}  # fmt: skip
    assert cpu_line(uses, "32 streams").endswith(f"{KVD_GGUF} 4.00 / 0.50; {VLLM} 4.00 / 0.50")
    line = settle_line({SINGLE: uses, STREAMS: {VLLM: [CpuUse(0, 0, 0, 1, 7.25)]}})
    assert line.endswith(f": {KVD_GGUF} 0.2, {VLLM} 7.2")  # the longest of every section's runs
