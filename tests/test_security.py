"""Security: nothing is unpickled, no config content is evaluated, templates run sandboxed.

* The package source is scanned (AST) for pickle-based loading (``torch.load`` without
  ``weights_only=True``, ``pickle``/``dill``/``joblib``/``marshal``/``shelve``, numpy
  ``allow_pickle``, ``read_pickle``, ``torch.jit.load``), model ``from_pretrained`` without
  ``use_safetensors=True``, ``trust_remote_code=True``, unsafe YAML loading, unsandboxed
  Jinja2 and ``eval``/``exec``/``compile``/``__import__``. The scanner is tested on
  snippets first, so a pass means something.
* Files whose unpickling would run code (they create a marker file) are offered wherever a
  checkpoint, model or data file is loaded; each is refused and the marker never appears.
* Judge templates that reach for Python internals are refused, also from config files.
* A YAML config with Python tags is refused without running them.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from self_rewarding_lm_pytorch.judge import (
    RewardConfig,
    RewardModelJudge,
    TemplateSecurityError,
)
from self_rewarding_lm_pytorch.trainers.checkpoint import load_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "self_rewarding_lm_pytorch"

PICKLE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
}
UNSAFE_YAML = {
    "unsafe_load",
    "unsafe_load_all",
    "full_load",
    "full_load_all",
    "Loader",
    "UnsafeLoader",
    "FullLoader",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
EVAL_BUILTINS = {"eval", "exec", "compile", "__import__"}
# from_pretrained receivers that load no weights (or only after a safetensors check)
NO_WEIGHTS = ("Tokenizer", "Config", "PeftModel", "GenerationConfig", "Processor")


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe loading / evaluation construct in ``source``, as 'file:line: what'."""
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                flag(node, f"imports from {node.module}")
            if module == "jinja2" and any(
                a.name in ("Environment", "Template") for a in node.names
            ):
                flag(node, "unsandboxed jinja2 Environment/Template")
            if module == "torch" and any(a.name == "load" for a in node.names):
                flag(node, "imports torch.load by name")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name.startswith("yaml.") and node.attr in UNSAFE_YAML:
                flag(node, f"unsafe YAML {name}")
            if name in ("jinja2.Environment", "jinja2.Template"):
                flag(node, f"unsandboxed {name}")
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        last = func.rsplit(".", 1)[-1]
        if isinstance(node.func, ast.Name) and node.func.id in EVAL_BUILTINS:
            flag(node, f"calls {node.func.id}()")
        if func in ("torch.load", "th.load") and not _kw_true(node, "weights_only"):
            flag(node, f"{func} without weights_only=True")
        if func in ("torch.jit.load", "pd.read_pickle", "pandas.read_pickle"):
            flag(node, f"calls {func}")
        if (
            last == "load"
            and func.split(".")[0] in ("np", "numpy")
            and _kw_true(node, "allow_pickle")
        ):
            flag(node, f"{func} with allow_pickle=True")
        if func in ("yaml.load", "yaml.load_all"):
            loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
            if loader is None and len(node.args) > 1:
                loader = node.args[1]
            if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                flag(node, f"{func} without a safe Loader")
        if _kw_true(node, "trust_remote_code"):
            flag(node, "trust_remote_code=True")
        if last == "from_pretrained":
            receiver = func.rsplit(".", 1)[0]
            if not any(n in receiver for n in NO_WEIGHTS) and not _kw_true(node, "use_safetensors"):
                flag(node, f"{func} without use_safetensors=True")
    return found


def test_scanner_flags_every_unsafe_pattern_and_passes_safe_ones():
    unsafe = {
        "import pickle": "imports pickle",
        "from dill import loads": "imports from dill",
        "import joblib.numpy_pickle": "imports joblib",
        "torch.load(path)": "without weights_only=True",
        "torch.load(path, weights_only=False)": "without weights_only=True",
        "from torch import load": "torch.load by name",
        "torch.jit.load(path)": "calls torch.jit.load",
        "np.load(path, allow_pickle=True)": "allow_pickle=True",
        "pd.read_pickle(path)": "calls pd.read_pickle",
        "yaml.load(text)": "without a safe Loader",
        "yaml.load(text, Loader=yaml.Loader)": "unsafe YAML",
        "yaml.unsafe_load(text)": "unsafe YAML",
        "yaml.full_load(text)": "unsafe YAML",
        "eval(text)": "calls eval()",
        "exec(text)": "calls exec()",
        "__import__(name)": "calls __import__()",
        "compile(text, 'f', 'exec')": "calls compile()",
        "AutoModelForCausalLM.from_pretrained(p)": "without use_safetensors=True",
        "AutoModel.from_pretrained(p, trust_remote_code=True, use_safetensors=True)": "trust_remote_code",
        "jinja2.Environment()": "unsandboxed",
        "from jinja2 import Template": "unsandboxed",
    }
    for snippet, what in unsafe.items():
        hits = unsafe_calls(snippet)
        assert any(what in h for h in hits), f"{snippet!r} not flagged ({hits})"
    safe = [
        "torch.load(path, weights_only=True)",
        "yaml.safe_load(text)",
        "yaml.load(text, Loader=yaml.SafeLoader)",
        "model.eval()",
        "np.load(path)",
        "AutoTokenizer.from_pretrained(p)",
        "AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)",
        "from jinja2.sandbox import ImmutableSandboxedEnvironment",
        "state = self.__dict__.copy()",
    ]
    for snippet in safe:
        assert unsafe_calls(snippet) == [], snippet


def test_package_source_has_no_unsafe_loading_or_evaluation():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 15  # the scan saw the package
    found = []
    for f in files:
        found += unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))
    assert found == [], "\n".join(found)


# ====================================================================== pickled files


class _Payload:
    """Unpickling this object calls ``open(marker, 'w')``, creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_evil_pickles(folder: Path, marker: Path) -> list[Path]:
    """A torch zip checkpoint and a raw pickle that run code when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"token_emb.emb.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    (folder / "model.pt").write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    return [folder / "pytorch_model.bin", folder / "model.pt"]


def test_the_evil_files_really_run_code_when_unpickled(tmp_path):
    """Control: the payload is live, so 'the marker never appears' below means something."""
    marker = tmp_path / "pwned"
    bin_file, pt_file = write_evil_pickles(tmp_path / "evil", marker)
    torch.load(bin_file, weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pt_file.read_bytes())
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):  # the safe torch loader refuses it
        torch.load(bin_file, weights_only=True)
    assert not marker.exists()


def test_checkpoint_folder_with_only_pickle_files_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint"
    files = write_evil_pickles(folder, marker)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"no .safetensors file .*never unpickles"):
        load_checkpoint(model, folder)
    for f in files:  # a pickle file named directly is refused too
        with pytest.raises(
            FileNotFoundError, match=r"neither a checkpoint folder nor a .safetensors"
        ):
            load_checkpoint(model, f)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_never_unpickles_a_checkpoint_named_in_state_json(tmp_path):
    """A tampered state.json pointing a finished stage at a pickle folder is refused."""
    from tiny import make_trainer

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    write_evil_pickles(run / "evil", marker)
    plan = ["01-external-reward-dpo"]
    state = {"plan": plan, "finished": [{"stage": plan[0], "checkpoint": "evil"}]}
    run.joinpath("state.json").write_text(json.dumps(state))
    with pytest.raises(FileNotFoundError, match=r"never unpickles"):
        make_trainer(str(run), num_pairs=2).run()
    assert not marker.exists()


def test_srlm_model_checkpoint_that_is_a_pickle_is_refused(tmp_path):
    from self_rewarding_lm_pytorch.cli import build_model
    from self_rewarding_lm_pytorch.config import parse_run_config

    marker = tmp_path / "pwned"
    bin_file, pt_file = write_evil_pickles(tmp_path / "evil", marker)
    for checkpoint in (bin_file, pt_file, bin_file.parent):
        cfg = parse_run_config(
            {
                "model": {
                    "xtransformers": {
                        "num_tokens": 256,
                        "max_seq_len": 64,
                        "attn_layers": {"dim": 16, "depth": 1, "heads": 2},
                    },
                    "checkpoint": str(checkpoint),
                },
                "tokenizer": {"kind": "bytes"},
                "stages": [{"kind": "sft"}],
                "data": {"sft": {"path": "x.jsonl"}},
            },
            check_files=False,
        )
        with pytest.raises(FileNotFoundError, match=r"safetensors"):
            build_model(cfg)
    assert not marker.exists()


def test_hugging_face_folder_with_only_pickled_weights_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model

    marker = tmp_path / "pwned"
    folder = build_tiny_model(tmp_path / "model")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    write_evil_pickles(folder, marker)
    with pytest.raises(OSError, match=r"safetensors"):
        load_model(folder)
    assert not marker.exists()


def test_pickle_data_files_are_refused(tmp_path):
    from self_rewarding_lm_pytorch.config import DataSource
    from self_rewarding_lm_pytorch.io import load_prompts

    marker = tmp_path / "pwned"
    for name in ("prompts.pkl", "prompts.pt", "prompts.pickle"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps([_Payload(marker)]))
        with pytest.raises(ValueError, match=r"cannot tell the format"):
            load_prompts(DataSource(path=str(path)))
    assert not marker.exists()


# ====================================================================== templates


EVIL_TEMPLATES = [
    "{{ prompt.__class__.__mro__ }} {{ response }}",
    "{{ prompt }} {{ response.__init__.__globals__ }}",
    "{{ prompt|attr('__class__') }} {{ response }}",
    "{{ prompt }} {{ response.__class__.__base__.__subclasses__() }}",
    "{{ prompt['__class__'] }} {{ response }}",
]


@pytest.mark.parametrize("template", EVIL_TEMPLATES)
def test_template_reaching_for_python_internals_is_refused(template):
    with pytest.raises(TemplateSecurityError, match=r"sandbox forbids"):
        RewardConfig(prompt_template=template, reward_regex_template="Score: {{ reward }}")


def test_text_that_looks_like_a_template_is_inserted_verbatim():
    config = RewardConfig(
        prompt_template="User: {{ prompt }}\nAnswer: {{ response }}",
        reward_regex_template="Score: {{ reward }}",
    )
    text = config.render("{{ prompt.__class__ }}", "{% for x in range(9) %}{{ 7*7 }}{% endfor %}")
    assert text == (
        "User: {{ prompt.__class__ }}\nAnswer: {% for x in range(9) %}{{ 7*7 }}{% endfor %}"
    )


def test_template_in_a_config_file_is_refused_before_any_work(tmp_path):
    from self_rewarding_lm_pytorch.config import parse_run_config

    cfg = {
        "model": {
            "xtransformers": {
                "num_tokens": 256,
                "max_seq_len": 64,
                "attn_layers": {"dim": 16, "depth": 1, "heads": 2},
            }
        },
        "tokenizer": {"kind": "bytes"},
        "data": {"sft": {"path": "x.jsonl"}},
        "stages": [{"kind": "sft"}],
        "reward_config": {"prompt_template": EVIL_TEMPLATES[0]},
    }
    with pytest.raises(Exception, match=r"sandbox forbids") as info:
        parse_run_config(cfg, check_files=False)
    assert isinstance(info.value, (TemplateSecurityError, ValueError))


def test_srlm_reports_a_forbidden_template_as_a_config_error(tmp_path, capsys):
    from self_rewarding_lm_pytorch.cli import main

    (tmp_path / "x.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    config = tmp_path / "evil.yaml"
    config.write_text(
        "model:\n"
        "  xtransformers: {num_tokens: 256, max_seq_len: 64, attn_layers: {dim: 16, depth: 1, heads: 2}}\n"
        "tokenizer: {kind: bytes}\n"
        "data: {sft: {path: x.jsonl}}\n"
        "stages: [{kind: sft}]\n"
        'reward_config: {prompt_template: "{{ prompt.__class__ }} {{ response }}"}\n'
    )
    assert main(["run", str(config), "--check"]) == 2
    assert "sandbox forbids" in capsys.readouterr().err


def test_reward_model_template_is_refused_at_construction():
    with pytest.raises(TemplateSecurityError, match=r"sandbox forbids"):
        RewardModelJudge(
            tiny_model(), char_tokenizer(), template="{{ prompt.__class__ }} {{ response }}"
        )


def test_chat_template_reaching_for_python_internals_is_refused():
    """Chat templates (``tokenizer.chat_template_file`` in a config) are rendered by
    transformers in its own Jinja2 sandbox."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from jinja2.sandbox import SecurityError

    from self_rewarding_lm_pytorch.models import HFTokenizer

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=words)
    tok.chat_template = (
        "{{ messages.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(SecurityError, match=r"__class__"):
        HFTokenizer(tok).format_prompt("hello")
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert HFTokenizer(tok).format_prompt("hello") == "[hello]"


# ====================================================================== YAML


def test_yaml_config_with_python_tags_is_refused_without_running_them(tmp_path):
    from self_rewarding_lm_pytorch.config import ConfigError, load_run_config

    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(
        f'seed: !!python/object/apply:builtins.open ["{marker}", "w"]\nstages: [{{kind: sft}}]\n'
    )
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_run_config(config)
    assert not marker.exists()


def test_config_strings_are_never_evaluated(tmp_path):
    from self_rewarding_lm_pytorch.config import ConfigError, parse_run_config

    marker = tmp_path / "pwned"
    code = f"__import__('builtins').open({str(marker)!r}, 'w')"
    with pytest.raises(ConfigError, match=r"expected an integer, got str"):
        parse_run_config(
            {"model": {"path": "m"}, "stages": [{"kind": "sft"}], "seed": code},
            check_files=False,
        )
    assert not marker.exists()
