"""Engine flags generated from EngineConfig (jaxinfer/config_cli.py) on generate, chat and serve; quantization
as an EngineConfig field."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from jaxinfer.cli import build_parser, main
from jaxinfer.config import EngineConfig
from jaxinfer.config_cli import (
    add_engine_args,
    engine_config_from_args,
    engine_config_kwargs,
    engine_flags,
    skipped_fields,
)
from jaxinfer.errors import QuantizationError

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"generate": ["generate", "a prompt"], "chat": ["chat"], "serve": ["serve"]}
# Engine flags that existed before they were generated; each keeps its name and meaning.
LEGACY_FLAGS = {"--dtype": ("float32", "dtype", "float32"), "--max-model-len": ("1024", "max_model_len", 1024),
                "--tensor-parallel-size": ("2", "tensor_parallel_size", 2),
                "--data-parallel-size": ("2", "data_parallel_size", 2),
                "--kv-cache-memory": ("2GiB", "kv_cache_memory", "2GiB"),
                "--max-num-seqs": ("8", "max_num_seqs", 8),
                "--max-num-batched-tokens": ("64", "max_num_batched_tokens", 64),
                "--quantization": ("gguf", "quantization", "gguf")}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(name: str) -> set[str]:
    return {s for a in _subparser(name)._actions for s in a.option_strings}


def _parse(command: str, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args(COMMANDS[command] + list(flags))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_has_a_flag(command):
    options = _options(command)
    flags = {f.field: f.flag for f in engine_flags()}
    fields = [f.name for f in dataclasses.fields(EngineConfig)]
    assert sorted(flags) == sorted(set(fields) - set(skipped_fields()))
    missing = [flag for flag in flags.values() if flag not in options]
    assert not missing, f"{command} lacks {missing}"
    for name in ("kv_cache_dtype", "speculative_method", "num_speculative_tokens", "enable_prefix_caching",
                 "attention_impl", "quantization"):
        assert name in flags  # the flags this generator exists for
    assert "--no-enable-prefix-caching" in options and "--model" in options


def test_every_field_has_help():
    for f in dataclasses.fields(EngineConfig):
        assert f.metadata.get("help"), f"EngineConfig.{f.name} needs metadata['help'] (its flag's help text)"


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("flag", list(LEGACY_FLAGS))
def test_legacy_flags_keep_working(command, flag):
    text, field, value = LEGACY_FLAGS[flag]
    args = _parse(command, "--model", "m", flag, text)
    assert args.model == "m"
    assert engine_config_kwargs(args) == {field: value}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_flags_parse_into_engine_config(command):
    args = _parse(command, "--kv-cache-dtype", "int8", "--no-enable-prefix-caching", "--quantization", "gguf",
                  "--speculative-method", "ngram", "--num-speculative-tokens", "5", "--kv-cache-memory-fraction",
                  "0.5", "--attention-impl", "xla", "--kv-cache-memory", "1048576", "--engine-seed", "7")
    cfg = engine_config_from_args(args)
    default = EngineConfig()
    assert cfg.kv_cache_dtype == "int8" and cfg.enable_prefix_caching is False and cfg.quantization == "gguf"
    assert (cfg.speculative_method, cfg.num_speculative_tokens) == ("ngram", 5)
    assert (cfg.kv_cache_memory_fraction, cfg.attention_impl, cfg.seed) == (0.5, "xla", 7)
    assert cfg.kv_cache_memory == 1048576  # int | str: digits become an int, "2GiB" stays a string
    # flags not given keep the EngineConfig defaults
    assert (cfg.max_num_seqs, cfg.page_size, cfg.dtype, cfg.enable_chunked_prefill, cfg.max_model_len) == (
        default.max_num_seqs, default.page_size, default.dtype, default.enable_chunked_prefill, default.max_model_len)
    assert engine_config_from_args(_parse(command)) == default
    assert engine_config_from_args(_parse(command, "--enable-chunked-prefill")).enable_chunked_prefill is True


def test_seed_flags_stay_apart():
    args = _parse("generate", "--seed", "5")
    assert args.seed == 5 and engine_config_from_args(args).seed == EngineConfig().seed
    args = _parse("chat", "--engine-seed", "9")
    assert args.seed is None and engine_config_from_args(args).seed == 9


@pytest.mark.parametrize("argv", [["--kv-cache-dtype", "int7"], ["--quantization", "awq"], ["--dtype", "float7"],
                                  ["--max-num-seqs", "x"]])
def test_bad_flag_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse("generate", *argv)
    assert e.value.code == 2


def test_generate_help_lists_engine_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--kv-cache-dtype", "--enable-prefix-caching", "--no-enable-prefix-caching", "--speculative-method",
                 "--quantization", "--max-model-len", "--engine-seed"):
        assert flag in out
    assert "int8" in out and "default: 32" in out  # choices and EngineConfig defaults are shown


def test_generate_passes_the_flags_to_llm(monkeypatch):
    import jaxinfer.llm

    seen = {}

    class FakeLLM:
        def __init__(self, model, **kwargs):
            seen.update(kwargs, model=model)
            raise ValueError("stop here")

    monkeypatch.setattr(jaxinfer.llm, "LLM", FakeLLM)
    rc = main(["generate", "hi", "--model", "m", "--kv-cache-dtype", "int8", "--quantization", "gguf",
               "--no-enable-prefix-caching", "--dtype", "float32", "--seed", "3"])
    assert rc == 2
    assert seen == {"model": "m", "kv_cache_dtype": "int8", "quantization": "gguf", "enable_prefix_caching": False,
                    "dtype": "float32"}


def test_serve_builds_the_engine_config_from_the_flags(monkeypatch):
    import jaxinfer.engine_factory
    from serve.cli import SERVE_STEP_TOKENS_PER_REQUEST, build_engine

    seen = {}
    monkeypatch.setattr(jaxinfer.engine_factory, "create_engine", lambda model, config: seen.update(m=model, c=config))
    build_engine(_parse("serve", "--model", "m", "--no-warmup", "--max-num-seqs", "4", "--kv-cache-dtype", "fp8",
                        "--speculative-method", "ngram"))
    assert seen["m"] == "m"
    # jaxinfer serve's own default: the step share (the engine's default is off)
    assert seen["c"] == EngineConfig(max_num_seqs=4, kv_cache_dtype="fp8", speculative_method="ngram",
                                     max_step_tokens_per_request=SERVE_STEP_TOKENS_PER_REQUEST)
    build_engine(_parse("serve", "--model", "m", "--no-warmup", "--max-step-tokens-per-request", "0"))
    assert seen["c"] == EngineConfig()  # 0: off
    build_engine(_parse("serve", "--model", "m", "--no-warmup", "--max-step-tokens-per-request", "5"))
    assert seen["c"] == EngineConfig(max_step_tokens_per_request=5)


def test_choice_tables_match_the_jax_side():
    from jaxinfer import config, kv_cache
    from pallas_kernels import backend

    assert set(config.KV_CACHE_DTYPE_CHOICES) == set(kv_cache.KV_CACHE_DTYPES)
    assert config.ATTENTION_IMPLS == backend.ATTENTION_IMPLS


def test_building_the_parser_does_not_import_jax():
    code = ("import sys\nfrom jaxinfer.cli import build_parser\nbuild_parser().parse_args(['generate', 'x'])\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_generator_rules_on_a_toy_config():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        mode: Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "mode"})
        size: int | str | None = dataclasses.field(default=None, metadata={"help": "size"})
        flag: bool = dataclasses.field(default=False, metadata={"help": "a switch"})
        hook: object = dataclasses.field(default=None, metadata={"cli": False})  # a callable: not a flag

    p = argparse.ArgumentParser()
    add_engine_args(p, Toy)
    assert skipped_fields(Toy) == ["hook"]
    assert engine_config_kwargs(p.parse_args(["--mode", "b", "--size", "2GiB", "--flag"]), Toy) == {
        "mode": "b", "size": "2GiB", "flag": True}
    assert engine_config_kwargs(p.parse_args(["--size", "12", "--no-flag"]), Toy) == {"size": 12, "flag": False}
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])

    @dataclasses.dataclass(frozen=True)
    class Unsupported:
        hook: object = None

    with pytest.raises(TypeError, match="metadata\\['cli'\\] = False"):
        add_engine_args(argparse.ArgumentParser(), Unsupported)


# ---- quantization is an EngineConfig field -------------------------------------------------------------------
def test_quantization_field_is_validated():
    from jaxinfer.loader import QUANTIZATION_OPTIONS

    assert EngineConfig().quantization is None
    assert QUANTIZATION_OPTIONS == (None, "gguf")
    assert EngineConfig(quantization="gguf").quantization == "gguf"
    with pytest.raises(QuantizationError, match="unknown quantization 'awq'"):
        EngineConfig(quantization="awq")


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("dp", [1, 2])
def test_engines_load_with_the_configs_quantization(monkeypatch, dp):
    import jaxinfer.engine_factory
    from jaxinfer.engine_factory import create_engine
    from jaxinfer.llm import LLM

    seen = []

    def fake_load_model(model, **kwargs):
        seen.append((model, kwargs["quantization"], dict(kwargs["mesh"].shape)))
        raise _Loaded

    monkeypatch.setattr(jaxinfer.engine_factory, "load_model", fake_load_model)
    with pytest.raises(_Loaded):
        create_engine("m", EngineConfig(quantization="gguf", data_parallel_size=dp), compilation_cache=False)
    with pytest.raises(_Loaded):
        LLM("m", quantization="gguf", data_parallel_size=dp, compilation_cache=False)
    with pytest.raises(_Loaded):
        LLM("m", data_parallel_size=dp, compilation_cache=False)
    mesh = {"data": dp, "model": 1}
    assert seen == [("m", "gguf", mesh), ("m", "gguf", mesh), ("m", None, mesh)]
    with pytest.raises(QuantizationError):
        LLM("m", quantization="awq")  # rejected by EngineConfig before anything loads
    assert len(seen) == 3
