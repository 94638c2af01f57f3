"""Issue 14, deliver 4: unknown keys at every level are errors naming the key and the nearest
valid one; a cyclic YAML alias is a one-line error, not a RecursionError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.errors import ConfigError
from stemset_assets.config.loading import load_config

ROOT = Path(__file__).resolve().parent.parent


def error_of(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "nearest"),
    [
        ("storag:\n  backend: s3\n", "storag", "storage"),  # was ignored: local defaults, silently
        ("profile:\n  h4n: {}\n", "profile", "profiles"),
        ("storage:\n  locl: {root: x}\n", "storage.locl", "local"),
        ("storage:\n  local: {rot: x}\n", "storage.local.rot", "root"),
        ("sensors:\n  settle: 3\n", "sensors.settle", "settle_s"),
        ("api:\n  tokn: x\n", "api.tokn", "token"),
        (
            "strategies:\n  s: {_: htdemucs, vocals: vocals, __params: {shift: 1}}\n",
            "strategies.s.__params.shift",
            "shifts",
        ),
        ("strategies:\n  s: {_: htdemucs, vocls: vocals}\n", "strategies.s.vocls", "vocals"),
        (
            "strategies:\n  s: {_: htdemucs_ft, other: {_: htdemucs_6s, guitr: guitar}}\n",
            "strategies.s.other.guitr",
            "guitar",
        ),
        (
            "strategies:\n  s: {_: htdemucs, vocals: vocals}\n"
            "profiles:\n  h4n: {strategies: [s], output: {formt: flac}}\n",
            "profiles.h4n.output.formt",
            "format",
        ),
    ],
)
def test_unknown_keys_at_every_level_name_the_key_and_the_nearest(tmp_path, text, key, nearest):
    message = error_of(tmp_path, text)
    assert key in message, message
    assert repr(nearest) in message, message
    assert "\n" not in message


def test_unknown_top_level_key_without_a_near_match(tmp_path):
    message = error_of(tmp_path, "colour: blue\n")
    assert "colour is not a known key in the top level" in message
    assert "storage" in message and "strategies" in message  # the allowed keys are listed


def test_custom_models_outputs_are_checked_when_they_load_not_when_read(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("strategies:\n  s: {_: my_model, anything: vocals}\n")
    assert load_config(path, env={}).strategy("s").stems == ["vocals"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("storage: &s\n  local: *s\n", "storage.local"),
        ("strategies:\n  s: &x {_: htdemucs, vocals: *x}\n", "strategies.s.vocals"),
        ("profiles: &p [*p]\n", "profiles[0]"),
    ],
)
def test_cyclic_alias_is_one_line(tmp_path, text, where):
    message = error_of(tmp_path, text)
    assert f"{where} refers back to itself through a YAML alias" in message
    assert "\n" not in message and "Recursion" not in message


def test_shared_alias_is_not_a_cycle(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "strategies:\n  a: &t {_: htdemucs, vocals: vocals}\n  b: *t\n"
        "profiles:\n  p: {strategies: [a, b]}\n  q: {strategies: [a]}\n"
    )
    assert set(load_config(path, env={}).strategies) == {"a", "b"}


def test_cli_prints_one_line_for_a_cyclic_alias(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("storage: &s\n  local: *s\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "stemset_assets.cli", "--config", str(path), "separate", "x.wav"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refers back to itself" in lines[0], out.stderr


PROVIDERS = {  # the README's table: one storage block, the same variables, four services
    "r2": {"STEMSET_S3_ENDPOINT_URL": "https://abc.r2.cloudflarestorage.com", "AWS_REGION": "auto"},
    "aws": {"AWS_REGION": "eu-west-1"},
    "minio": {"STEMSET_S3_ENDPOINT_URL": "http://minio-host:9000", "AWS_REGION": "us-east-1"},
    "seaweedfs": {"STEMSET_S3_ENDPOINT_URL": "http://seaweed-host:8333"},
}


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_readme_s3_block_reads_for_every_provider(tmp_path, provider):
    text = (ROOT / "README.md").read_text()
    block = text.split("**Any S3 service, the same variables.**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "config.yaml"
    path.write_text(block)
    env = {"STEMSET_S3_BUCKET": "stemset-media", **PROVIDERS[provider]}
    s3 = load_config(path, env=env).storage.s3
    assert s3.bucket == "stemset-media" and s3.endpoint_url == (PROVIDERS[provider].get("STEMSET_S3_ENDPOINT_URL"))
    assert s3.region == PROVIDERS[provider].get("AWS_REGION", "auto") and s3.access_key_id is None
