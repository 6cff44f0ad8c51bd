"""Bad input at the command line and in data files (``docs/bad-input.md``, table "The
command line and data files"): YAML with a key given twice, files that are not UTF-8,
data files of an unsupported format or with a broken line, resuming ``srlm generate`` /
``srlm judge`` onto an output made with other settings, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from self_rewarding_lm_pytorch.cli import build_datasets, build_tokenizer, main
from self_rewarding_lm_pytorch.config import ConfigError, DataSource, load_run_config, load_yaml
from self_rewarding_lm_pytorch.hf import build_tiny_model
from self_rewarding_lm_pytorch.io import load_prompts, load_sft, read_text

REPO = Path(__file__).resolve().parents[1]
XT_MODEL = {
    "xtransformers": {
        "num_tokens": 256,
        "max_seq_len": 64,
        "attn_layers": {"dim": 16, "depth": 1, "heads": 2},
    }
}


def config_text(**data_paths: str) -> str:
    """A small valid run config (an x-transformers model, bytes tokenizer) as YAML."""
    cfg = {
        "model": XT_MODEL,
        "tokenizer": {"kind": "bytes", "eos_id": 10},
        "data": {name: {"path": p} for name, p in data_paths.items()},
        "stages": [{"kind": "sft", "datasets": sorted(data_paths)}] if data_paths else [],
        "accelerate": {"cpu": True},
        "progress": False,
    }
    if not data_paths:
        cfg["data"] = {"sft": {"rows": [{"prompt": "a", "response": "b"}]}}
        cfg["stages"] = [{"kind": "sft", "datasets": ["sft"]}]
    return yaml.safe_dump(cfg, sort_keys=False)


# ====================================================================== YAML


def test_yaml_key_given_twice(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(config_text() + "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    lines = path.read_text().splitlines()
    first, second = lines.index("seed: 1") + 1, lines.index("seed: 2") + 1
    msg = str(info.value)
    assert f"{path}:{second}: the key 'seed' is given twice" in msg
    assert f"(first on line {first})" in msg and "remove one of them" in msg
    # inside a nested mapping (a stage) too, and from the command line: exit 2, one line
    nested = tmp_path / "nested.yaml"
    nested.write_text(config_text().replace("- kind: sft\n", "- kind: sft\n  kind: spin\n", 1))
    assert main(["run", str(nested), "--check"]) == 2
    err = capsys.readouterr().err
    assert "the key 'kind' is given twice" in err and "Traceback" not in err
    # the same loader reads any YAML file: lists, anchors and merges still work
    other = tmp_path / "other.yaml"
    other.write_text("base: &b {x: 1, y: 2}\nuse: {<<: *b, y: 3}\nitems: [1, 2]\n")
    assert load_yaml(other) == {"base": {"x": 1, "y": 2}, "use": {"x": 1, "y": 3}, "items": [1, 2]}


# ====================================================================== UTF-8


BAD = "caf\xe9".encode("latin-1")  # not UTF-8: a lone 0xE9 byte


@pytest.mark.parametrize(
    "name, content",
    [
        ("p.jsonl", b'{"prompt": "ok"}\n{"prompt": "' + BAD + b'"}\n'),
        ("p.json", b'[{"prompt": "ok"},\n {"prompt": "' + BAD + b'"}]\n'),
        ("p.csv", b"prompt\nok\n" + BAD + b"\n"),
        ("p.tsv", b"prompt\nok\n" + BAD + b"\n"),
    ],
)
def test_data_file_not_utf8(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    offset = content.index(b"\xe9")
    line = content[:offset].count(b"\n") + 1
    with pytest.raises(ValueError) as info:
        load_prompts(DataSource(path=str(path)))
    assert not isinstance(info.value, UnicodeDecodeError)
    msg = str(info.value)
    assert f"{path}:{line}: not valid UTF-8 (byte 0xe9 at byte offset {offset}" in msg, msg
    assert "re-save the file as UTF-8" in msg
    # a YAML config and a plain-text template file are read the same way
    config = tmp_path / "run.yaml"
    config.write_bytes(config_text().encode() + b"# " + BAD + b"\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: not valid UTF-8 .*re-save"):
        load_run_config(config)
    template = tmp_path / "judge.jinja"
    template.write_bytes(b"{{ prompt }}\n{{ response }} " + BAD)
    with pytest.raises(ValueError, match=r"judge.jinja:2: not valid UTF-8"):
        read_text(template)


def test_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt\nhello\n")  # as spreadsheet programs save CSV
    assert load_prompts(DataSource(path=str(path))) == ["hello"]


# ====================================================================== data files


def test_data_file_of_unsupported_format(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("write a poem\ntell a story\n")
    config = tmp_path / "run.yaml"
    config.write_text(config_text(sft=str(prompts)))
    # refused when the config is validated, before any model or data is loaded
    with pytest.raises(ConfigError) as info:
        load_run_config(config)
    msg = str(info.value)
    assert f"data.sft.path: cannot tell the format of {prompts}" in msg
    assert ".jsonl, .json, .csv, .tsv or .parquet" in msg and "format:" in msg
    assert main(["run", str(config), "--check"]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    # the command line names its own option
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(prompts),
                 "--out", str(tmp_path / "o.jsonl")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--prompts: cannot tell the format" in err and "--format" in err


def test_data_file_with_a_broken_line(tmp_path):
    good = tmp_path / "sft.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n')
    broken = tmp_path / "extra.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n')
    cfg = load_run_config(_write(tmp_path / "run.yaml", config_text(sft=str(good))))
    cfg.data["extra"] = DataSource(path=str(broken))  # given but used by no stage
    # every data file is read in full when the datasets are built: this one fails there
    with pytest.raises(
        ValueError, match=r"data.extra: .*extra.jsonl:2: not valid JSON .*one object"
    ):
        build_datasets(cfg, build_tokenizer(cfg))
    with pytest.raises(ValueError, match=r"extra.jsonl:2: not valid JSON"):
        load_sft(DataSource(path=str(broken)))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ====================================================================== resuming generate / judge

JUDGES = """
def words(prompt, response):
    return float(len(response.split()))


def chars(prompt, response):
    return float(len(response))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def judges(tmp_path, monkeypatch) -> Path:
    (tmp_path / "srlm_cli_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_resumed_with_other_settings(tmp_path, tiny, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nname a fish\nwrite a poem\n")
    out = tmp_path / "cands.jsonl"
    base = ["-q", "generate", "--model", str(tiny), "--out", str(out), "--max-new-tokens", "3",
            "--device", "cpu"]  # fmt: skip
    assert main([*base, "--prompts", str(prompts), "--num-candidates", "2"]) == 0
    made = out.read_bytes()
    capsys.readouterr()
    # other settings onto the same --out: refused before any work, naming old -> new
    assert main([*base, "--prompts", str(prompts), "--num-candidates", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds rows made with other settings (num_candidates: 2 -> 3)" in err, err
    assert "use another --out, or add --overwrite to replace the file" in err
    with pytest.raises(ConfigError, match=r"num_candidates: 2 -> 3"):  # what is raised
        main(["--debug", *base, "--prompts", str(prompts), "--num-candidates", "3"])
    # another prompt file with the same prompts: its rows are not reused
    other = tmp_path / "other.csv"
    other.write_bytes(prompts.read_bytes())
    assert main([*base, "--prompts", str(other), "--num-candidates", "2"]) == 2
    assert f'prompts: "{prompts}" -> "{other}"' in capsys.readouterr().err
    assert out.read_bytes() == made  # nothing was touched
    # --overwrite replaces the file
    assert main([*base, "--prompts", str(prompts), "--num-candidates", "3", "--overwrite"]) == 0
    rows = [json.loads(x) for x in out.open()]
    assert [len(r["responses"]) for r in rows] == [3, 3]
    assert all(r["generate_settings"]["num_candidates"] == 3 for r in rows)


def test_judge_resumed_with_other_settings(judges, capsys):
    rows = [{"prompt": "p", "response": "a b c"}, {"prompt": "q", "response": "d"}]
    data = _jsonl(judges / "rows.jsonl", rows)
    out = judges / "judged.jsonl"
    base = ["-q", "judge", "--input", str(data), "--out", str(out)]
    assert main([*base, "--function", "srlm_cli_judges:words"]) == 0
    assert [json.loads(x)["score"] for x in out.open()] == [3.0, 1.0]
    made = out.read_bytes()
    assert main([*base, "--function", "srlm_cli_judges:chars"]) == 2
    err = capsys.readouterr().err
    assert 'function: "srlm_cli_judges:words" -> "srlm_cli_judges:chars"' in err, err
    assert "--overwrite" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match=r'function: "srlm_cli_judges:words" -> '):
        main(["--debug", *base, "--function", "srlm_cli_judges:chars"])
    # an input row edited since: its old row is not kept next to the new one
    _jsonl(data, [rows[0], {"prompt": "q", "response": "d e"}])
    assert main([*base, "--function", "srlm_cli_judges:words"]) == 2
    err = capsys.readouterr().err
    assert "holds 1 rows made from input rows that" in err and "no longer gives" in err, err
    assert "(the first: id '1', prompt 'q')" in err
    assert out.read_bytes() == made
    # --overwrite judges again
    assert main([*base, "--function", "srlm_cli_judges:words", "--overwrite"]) == 0
    assert [json.loads(x)["score"] for x in out.open()] == [3.0, 2.0]


def test_output_file_not_written_by_srlm(judges, capsys):
    data = _jsonl(judges / "rows.jsonl", [{"prompt": "p", "response": "a b"}])
    foreign = _jsonl(judges / "scores.jsonl", [{"id": "0", "prompt": "p", "score": 9.0}])
    made = foreign.read_bytes()
    args = ["judge", "--input", str(data), "--function", "srlm_cli_judges:words"]
    assert main([*args, "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "line 1 is not a row written by srlm judge (it has no 'judge_key')" in err, err
    assert foreign.read_bytes() == made
    with pytest.raises(ConfigError, match=r"not a row written by srlm judge"):
        main(["--debug", *args, "--out", str(foreign)])
    # the input file itself as --out
    assert main([*args, "--out", str(data), "--overwrite"]) == 2
    assert "is the input file; write the output elsewhere" in capsys.readouterr().err
    assert json.loads(data.read_text()) == {"prompt": "p", "response": "a b"}


# ====================================================================== Ctrl-C

SLOW_JUDGE = '''
import os
import time
from pathlib import Path


def score(prompt, response):
    """A deterministic judge that says when it starts, then waits for the test's go-ahead."""
    Path(os.environ["SRLM_TEST_JUDGING"]).touch()
    go = Path(os.environ["SRLM_TEST_GO"])
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return None if not response else float(ord(response[-1]) % 3)
'''


def _as_from_a_terminal() -> None:
    """A command started from a shell gets Ctrl-C: SIGINT neither ignored nor blocked (a
    test worker may have inherited either from the libraries it loaded)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_during_a_stage(tmp_path, monkeypatch):
    (tmp_path / "srlm_slow_judge.py").write_text(SLOW_JUDGE)
    cfg = yaml.safe_load(config_text())
    cfg["data"]["prompts"] = {"rows": [{"prompt": f"prompt {i}"} for i in range(12)]}
    cfg["judges"] = {"slow": {"kind": "python", "function": "srlm_slow_judge:score"}}
    cfg["stages"] = [
        {"kind": "sft", "datasets": ["sft"], "trainer": {"batch_size": 1, "num_train_steps": 2}},
        {
            "kind": "external_reward_dpo",
            "judge": "slow",
            "prompts": "prompts",
            "num_preference_pairs": 3,
            "num_candidates": 3,
            "max_new_tokens": 6,
            "temperature": 1.0,
            "chunk_size": 1,
            "trainer": {"batch_size": 3, "num_train_steps": 1},
        },
    ]
    cfg["out"] = "run"
    config = _write(tmp_path / "run.yaml", yaml.safe_dump(cfg))
    judging = tmp_path / "judging"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "SRLM_TEST_JUDGING": str(judging),
        "SRLM_TEST_GO": str(tmp_path / "go"),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "self_rewarding_lm_pytorch.cli", "-q", "run", str(config)]
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_as_from_a_terminal,
    )
    deadline = time.monotonic() + 120
    while not judging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert judging.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: the second stage is judging
    _, err = proc.communicate(timeout=120)  # bounded; generous for a loaded CI machine
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "srlm run: interrupted; rerun the same command to resume"
    run = tmp_path / "run"
    stages = json.loads((run / "state.json").read_text())
    assert [r["stage"] for r in stages["finished"]] == ["01-sft"]  # the stage that finished
    cand = run / "02-external-reward-dpo" / "candidates.jsonl"
    before = cand.read_text().splitlines() if cand.exists() else []
    # the same command again (here in this process, to save a start-up) resumes, finishes
    (tmp_path / "go").touch()  # the judge no longer waits
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("SRLM_TEST_JUDGING", "SRLM_TEST_GO"):
        monkeypatch.setenv(name, env[name])
    assert main(command[3:]) == 0
    stages = json.loads((run / "state.json").read_text())
    assert [r["stage"] for r in stages["finished"]] == ["01-sft", "02-external-reward-dpo"]
    assert cand.read_text().splitlines()[: len(before)] == before  # judged records were kept


# ====================================================================== srlm run overrides


def _override_config(tmp_path: Path) -> Path:
    """A config with two stages and a judge (no file is opened: overrides are checked
    before the config is parsed)."""
    cfg = yaml.safe_load(config_text())
    cfg["stages"].append({"kind": "self_reward_dpo", "prompts": "sft"})
    cfg["judges"] = {"big": {"kind": "llm", "path": "no/such/judge"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_override_of_an_unknown_key(tmp_path, capsys):
    path = _override_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides=["sed=3"])
    msg = str(info.value)
    assert "override 'sed=3': RunConfig has no key 'sed' at 'sed'; did you mean 'seed'?" in msg
    assert "(valid keys: accelerate, data, generation, judges, model, out, " in msg
    # a stage's keys are those of its kind's dataclass
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides=["stages.1.num_candidate=3"])
    msg = str(info.value)
    assert "a stage of kind 'self_reward_dpo' has no key 'num_candidate'" in msg
    assert "did you mean 'num_candidates'?" in msg and "judge_settings" in msg
    # a judge's keys: its JudgeSpec fields (JudgeConfig's sampling settings among them)
    with pytest.raises(ConfigError, match=r"JudgeSpec has no key 'num_sample' at 'judges\.big"):
        load_run_config(path, overrides=["judges.big.num_sample=5"])
    with pytest.raises(ConfigError, match=r"judges has no entry 'small' \(defined: big\)"):
        load_run_config(path, overrides=["judges.small.num_samples=5"])
    with pytest.raises(ConfigError, match=r"'seed' is not KEY=VALUE"):
        load_run_config(path, overrides=["seed"])
    # from the command line: exit status 2, one line, nothing parsed or run
    assert main(["run", str(path), "sed=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("srlm run: config error: override 'sed=3': RunConfig has no key")
    assert "Traceback" not in err


def test_override_of_a_list_entry_out_of_range(tmp_path, capsys):
    path = _override_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides=["stages.5.trainer.beta=0.2"])
    assert (
        "override 'stages.5.trainer.beta=0.2': stages.5: index 5 is out of range; stages has "
        "2 entries (0-1)" in str(info.value)
    )
    with pytest.raises(ConfigError, match=r"stages is a list; give an entry number 0-1"):
        load_run_config(path, overrides=["stages.first.kind=sft"])
    assert main(["run", str(path), "stages.2.kind=sft"]) == 2
    assert "index 2 is out of range" in capsys.readouterr().err
