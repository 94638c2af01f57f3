"""config.yaml -> StemsetConfig: finding the file, ${VAR} substitution, validation, fingerprints."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpu_worker.errors import ConfigError
from gpu_worker.strategy import fingerprint
from stemset_assets import config as cfg
from stemset_assets.config import (
    DEFAULT_CONFIG_YAML,
    DEFAULT_PRICES,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
storage:
  backend: local
  local: {root: ./media}
gpu:
  backend: local
sensors:
  max_new_per_tick: %d
profiles:
  h4n:
    description: test takes
    strategies: [htdemucs]
strategies:
  htdemucs:
    _: htdemucs
    vocals: vocals
    other: other
"""

S3_BLOCK = """
storage:
  backend: s3
  s3:
    endpoint_url: https://${R2_ACCOUNT_ID}.r2.cloudflarestorage.com
    bucket: stemset-media
    access_key_id: ${R2_ACCESS_KEY_ID}
    secret_access_key: ${R2_SECRET_ACCESS_KEY}
    public_url: ${R2_PUBLIC_URL:-}
strategies:
  htdemucs: {_: htdemucs, vocals: vocals}
"""


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict | None = None):
    return load_config(write(tmp_path, text), env={} if env is None else env)


def error_of(tmp_path: Path, text: str, env: dict | None = None) -> tuple[str, Path]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return str(info.value), path


# --------------------------------------------------------------------------- finding the file


def test_load_config_order_cli_env_cwd_embedded(tmp_path, monkeypatch):
    cli = write(tmp_path / "a", MINIMAL % 1)
    from_env = write(tmp_path / "b", MINIMAL % 2)
    cwd = tmp_path / "c"
    in_cwd = write(cwd, MINIMAL % 3)
    monkeypatch.chdir(cwd)
    env = {"STEMSET_CONFIG": str(from_env)}

    assert load_config(str(cli), env).sensors.max_new_per_tick == 1
    assert load_config(None, env).sensors.max_new_per_tick == 2
    assert load_config(None, {}).sensors.max_new_per_tick == 3
    assert load_config(None, {"STEMSET_CONFIG": ""}).sensors.max_new_per_tick == 3  # empty: not named
    assert load_config("", env).sensors.max_new_per_tick == 2  # an empty --config names nothing either
    assert load_config(None, {}).path == in_cwd.resolve()

    in_cwd.unlink()
    embedded = load_config(None, {})
    assert embedded.path is None
    assert embedded.sensors.max_new_per_tick == 200
    assert set(embedded.strategies) == {"htdemucs", "htdemucs_ft", "htdemucs_6s", "vocals_guitar_piano"}
    # The embedded default anchors relative paths at the CWD.
    assert embedded.storage.local.root == cwd.resolve() / "media"


@pytest.mark.parametrize("via", ["cli", "env"])
def test_named_config_that_is_missing_is_an_error(tmp_path, monkeypatch, via):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, MINIMAL % 5)  # a ./config.yaml must not be used as a fallback
    missing = tmp_path / "nope" / "stemset.yaml"
    with pytest.raises(ConfigError) as info:
        if via == "cli":
            load_config(str(missing), {})
        else:
            load_config(None, {"STEMSET_CONFIG": str(missing)})
    assert str(missing) in str(info.value)
    assert ("--config" if via == "cli" else "STEMSET_CONFIG") in str(info.value)


def test_relative_local_root_is_anchored_at_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "conf", MINIMAL % 1)
    config = load_config("conf/config.yaml", {})
    assert config.path == path.resolve()
    assert config.storage.local.root == (tmp_path / "conf" / "media").resolve()


# --------------------------------------------------------------------------- substitution


def test_substitution_with_and_without_defaults(tmp_path):
    text = """
    # A comment may say $5 or ${NOT_SET_ANYWHERE}: comments are not substituted.
    storage:
      local: {root: "${MEDIA_ROOT}/x-${SUFFIX:-dflt}"}
    gpu:
      type: ${GPU_TYPE:-T4}
      app: ${APP_NAME:-stemset-gpu}
    sensors:
      max_new_per_tick: ${MAX_NEW:-7}
    profiles:
      h4n:
        description: ${DESC:-}
        strategies: ["${STRAT:-htdemucs}"]
    strategies:
      htdemucs: {_: "${MODEL:-htdemucs}", vocals: vocals}
    """
    media = tmp_path / "m"
    env = {"MEDIA_ROOT": str(media), "GPU_TYPE": "L4", "APP_NAME": "", "MODEL": "htdemucs_ft"}
    config = load_text(tmp_path, text, env)
    assert config.storage.local.root == media / "x-dflt"
    assert config.gpu.type == "L4"  # set: the variable wins
    assert config.gpu.app == "stemset-gpu"  # set but empty: ${VAR:-d} takes the default
    assert config.sensors.max_new_per_tick == 7
    assert config.profiles["h4n"].description == ""
    assert config.profiles["h4n"].strategies == ("htdemucs",)
    assert config.strategies["htdemucs"].models == ["htdemucs_ft"]
    assert config.strategy_trees["htdemucs"]["_"] == "htdemucs_ft"

    env["SUFFIX"] = "given"
    assert load_text(tmp_path, text, env).storage.local.root == media / "x-given"


def test_missing_variable_error_names_variable_key_path_and_file(tmp_path):
    message, path = error_of(tmp_path, S3_BLOCK, {"R2_ACCOUNT_ID": "acc", "R2_SECRET_ACCESS_KEY": "s"})
    assert "R2_ACCESS_KEY_ID" in message
    assert "storage.s3.access_key_id" in message
    assert str(path) in message
    assert "Export R2_ACCESS_KEY_ID" in message and "${R2_ACCESS_KEY_ID:-default}" in message


def test_missing_variable_inside_a_string_and_a_list(tmp_path):
    message, _ = error_of(tmp_path, S3_BLOCK, {"R2_ACCESS_KEY_ID": "k", "R2_SECRET_ACCESS_KEY": "s"})
    assert "R2_ACCOUNT_ID" in message and "storage.s3.endpoint_url" in message

    text = MINIMAL.replace("[htdemucs]", "[htdemucs, '${EXTRA}']") % 1
    message, _ = error_of(tmp_path, text)
    assert "EXTRA" in message and "profiles.h4n.strategies[1]" in message


def test_unused_s3_section_needs_no_variables(tmp_path):
    text = S3_BLOCK.replace("backend: s3", "backend: local")
    config = load_text(tmp_path, text, {})
    assert config.storage.backend == "local"
    assert config.storage.s3 is None
    # ... and the shipped file loads with an empty environment.
    assert load_config(REPO / "config.yaml", {}).storage.s3 is None


def test_used_s3_section_is_read(tmp_path):
    env = {"R2_ACCOUNT_ID": "acc", "R2_ACCESS_KEY_ID": "kid", "R2_SECRET_ACCESS_KEY": "sec"}
    s3 = load_text(tmp_path, S3_BLOCK, env).storage.s3
    assert s3.endpoint_url == "https://acc.r2.cloudflarestorage.com"
    assert (s3.bucket, s3.region, s3.access_key_id, s3.secret_access_key) == ("stemset-media", "auto", "kid", "sec")
    assert s3.public_url is None


def test_gpu_url_and_token_variables_matter_only_for_http(tmp_path):
    text = """
    gpu:
      backend: %s
      url: ${WORKER_URL}
      token: ${WORKER_TOKEN}
    """
    config = load_text(tmp_path, text % "local")
    assert config.gpu.url is None and config.gpu.token is None

    message, _ = error_of(tmp_path, text % "http", {"WORKER_TOKEN": "t"})
    assert "WORKER_URL" in message and "gpu.url" in message

    config = load_text(tmp_path, text % "http", {"WORKER_URL": "https://gpu.example/", "WORKER_TOKEN": "t"})
    assert config.gpu.url == "https://gpu.example"
    assert config.gpu.token == "t"


def test_http_backend_requires_a_url(tmp_path):
    message, path = error_of(tmp_path, "gpu: {backend: http, url: '${GPU_WORKER_URL:-}'}")
    assert f"{path}: gpu.url is required when gpu.backend is http" in message


# --------------------------------------------------------------------------- secrets


def test_secrets_never_appear_in_repr_or_str(tmp_path):
    secrets = {"R2_ACCESS_KEY_ID": "KEYID-abc123", "R2_SECRET_ACCESS_KEY": "SECRET-def456"}
    text = S3_BLOCK + "\ngpu: {backend: http, url: 'https://w.example', token: '${TOKEN}'}\n"
    env = {"R2_ACCOUNT_ID": "acc", "TOKEN": "TOKEN-ghi789", **secrets}
    config = load_text(tmp_path, text, env)
    # The values are there for the code that needs them ...
    assert config.storage.s3.access_key_id == "KEYID-abc123"
    assert config.storage.s3.secret_access_key == "SECRET-def456"
    assert config.gpu.token == "TOKEN-ghi789"
    # ... and absent from every printed form.
    shown = [
        repr(config),
        str(config),
        repr(config.storage),
        str(config.storage.s3),
        repr(config.storage.s3),
        repr(config.gpu),
        str(config.gpu),
    ]
    for text_form in shown:
        for secret in ("KEYID-abc123", "SECRET-def456", "TOKEN-ghi789"):
            assert secret not in text_form
    assert "secret_access_key='***'" in repr(config.storage.s3)
    assert "token='***'" in repr(config.gpu)
    assert "bucket='stemset-media'" in repr(config.storage.s3)


# --------------------------------------------------------------------------- validation


def test_unknown_key_in_a_known_section_is_a_typo_error(tmp_path):
    message, path = error_of(tmp_path, "gpu:\n  backend: local\n  tpye: T4\n")
    assert f"{path}: gpu.tpye is not a known key" in message
    assert "allowed: backend, type, app" in message
    assert "Did you mean 'type'?" in message

    message, _ = error_of(
        tmp_path, (MINIMAL % 1).replace("strategies: [htdemucs]", "strategies: [htdemucs]\n    outptu: {}")
    )
    assert "profiles.h4n.outptu" in message

    message, _ = error_of(tmp_path, "storage:\n  backend: local\n  s3: {bukcet: x}\n")
    assert "storage.s3.bukcet" in message  # caught even though s3 is unused


def test_unknown_top_level_keys_are_errors_but_x_keys_hold_anchors(tmp_path):
    message, _ = error_of(tmp_path, (MINIMAL % 4) + "\nfuture_feature: {anything: 1}\n")
    assert "future_feature is not a known key in the top level" in message  # issue 14: was ignored
    config = load_text(tmp_path, (MINIMAL % 4) + "\nx-defaults: &d {anything: 1}\n")
    assert config.sensors.max_new_per_tick == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu: {backend: cuda}", "gpu.backend must be one of local, modal, http (got 'cuda')"),
        ("storage: {backend: gcs}", "storage.backend must be one of local, s3 (got 'gcs')"),
        ("profiles: {h4n: {output: {format: mp3}}}", "profiles.h4n.output.format must be one of wav, flac, opus, m4a"),
        ("profiles: {h4n: {output: {bitrate: 5000}}}", "profiles.h4n.output.bitrate must be a whole number"),
        ("sensors: {max_new_per_tick: 0}", "sensors.max_new_per_tick must be a whole number from 1"),
        ("gpu: {timeout_s: -1}", "gpu.timeout_s must be seconds"),
        ("gpu: {prices_per_hour: {T4: cheap}}", "gpu.prices_per_hour.T4 must be a price"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, text, expected):
    message, path = error_of(tmp_path, text)
    assert f"{path}: {expected}" in message


def test_bad_bucket_name(tmp_path):
    env = {"R2_ACCOUNT_ID": "a", "R2_ACCESS_KEY_ID": "k", "R2_SECRET_ACCESS_KEY": "s"}
    message, _ = error_of(tmp_path, S3_BLOCK.replace("stemset-media", "Stemset_Media"), env)
    assert "storage.s3.bucket" in message and "'Stemset_Media'" in message


def test_bad_yaml_reports_the_line(tmp_path):
    text = "gpu:\n  backend: local\nsensors:\n  max_new_per_tick: [1, 2\nprofiles: {}\n"
    message, path = error_of(tmp_path, text)
    assert str(path) in message and "not valid YAML" in message
    assert "line 5" in message


def test_duplicate_key_reports_the_line(tmp_path):
    text = "strategies:\n  a: {_: htdemucs, vocals: vocals}\n  a: {_: htdemucs, drums: drums}\n"
    message, _ = error_of(tmp_path, text)
    assert "duplicate key 'a'" in message and "line 3" in message


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    message, path = error_of(tmp_path, text)
    assert f"{path}: the file is empty" in message


def test_top_level_must_be_a_mapping(tmp_path):
    message, _ = error_of(tmp_path, "- a\n- b\n")
    assert "top level must be a mapping" in message


def test_profile_naming_an_unknown_strategy(tmp_path):
    message, path = error_of(tmp_path, (MINIMAL % 1).replace("[htdemucs]", "[htdemucs, htdemucs_ff]"))
    assert f"{path}: profiles.h4n.strategies[1] names unknown strategy 'htdemucs_ff'" in message
    assert "known: htdemucs" in message


@pytest.mark.parametrize("bad", ["H4N", "my-profile", "2takes", "with space"])
def test_profile_and_strategy_names_must_be_key_safe(tmp_path, bad):
    message, _ = error_of(tmp_path, f"profiles:\n  '{bad}': {{description: x}}\n")
    assert f"profiles.{bad}" in message and "not usable as a path segment" in message
    message, _ = error_of(tmp_path, f"strategies:\n  '{bad}': {{_: htdemucs, vocals: vocals}}\n")
    assert f"strategies.{bad}" in message and "not usable as a path segment" in message


def test_strategy_errors_are_config_errors_naming_the_file(tmp_path):
    message, path = error_of(tmp_path, "strategies:\n  x: {_: htdemucs, vocals: vocals, __params: {shifts: 99}}\n")
    assert message.startswith(f"{path}: ")
    assert "strategies.x.__params.shifts" in message


def test_lookup_of_unknown_strategy_and_profile(tmp_path):
    config = load_text(tmp_path, MINIMAL % 1)
    assert config.strategy("htdemucs").stems == ["vocals", "other"]
    assert config.profile("h4n").strategies == ("htdemucs",)
    with pytest.raises(ConfigError, match=r"no strategy named 'nope'.*known: htdemucs"):
        config.strategy("nope")
    with pytest.raises(ConfigError, match=r"no profile named 'nope'.*known: h4n"):
        config.profile("nope")


# --------------------------------------------------------------------------- models.repo


def test_model_repo_from_file_env_override_and_empty(tmp_path):
    in_file = tmp_path / "weights_file"
    in_env = tmp_path / "weights_env"
    in_file.mkdir()
    in_env.mkdir()
    text = (MINIMAL % 1) + "\nmodels: {repo: ./weights_file}\n"  # relative to the config's folder
    assert load_text(tmp_path, text, {}).models.repo == in_file.resolve()
    assert load_text(tmp_path, text, {"STEMSET_MODEL_REPO": str(in_env)}).models.repo == in_env
    assert load_text(tmp_path, text, {"STEMSET_MODEL_REPO": ""}).models.repo is None
    # The shipped form: ${STEMSET_MODEL_REPO:-} is empty when the variable is unset.
    assert load_config(REPO / "config.yaml", {}).models.repo is None


def test_model_repo_that_does_not_exist(tmp_path):
    missing = tmp_path / "no_such_weights"
    message, path = error_of(tmp_path, MINIMAL % 1, {"STEMSET_MODEL_REPO": str(missing)})
    assert str(path) in message and str(missing) in message
    assert "STEMSET_MODEL_REPO" in message and "not an existing folder" in message

    message, _ = error_of(tmp_path, (MINIMAL % 1) + "\nmodels: {repo: ./gone}\n")
    assert "models.repo" in message and str(tmp_path / "gone") in message


# --------------------------------------------------------------------------- prices


def test_price_table_defaults(tmp_path):
    gpu = load_text(tmp_path, MINIMAL % 1).gpu
    assert DEFAULT_PRICES == {"T4": 0.59, "L4": 0.70, "A10G": 1.10, "A100-40GB": 2.50, "H100": 4.00}
    for name, price in DEFAULT_PRICES.items():
        assert gpu.price_per_hour(name) == price
    assert gpu.price_per_hour() == 2.50  # the configured type, A100-40GB by default
    with pytest.raises(ConfigError) as info:
        gpu.price_per_hour("B200")
    assert "'B200'" in str(info.value) and "T4, L4, A10G, A100-40GB, H100" in str(info.value)


def test_price_table_override_merges(tmp_path):
    text = "gpu: {backend: modal, type: B200, prices_per_hour: {T4: 0.40, B200: 6.25}}"
    gpu = load_text(tmp_path, text).gpu
    assert gpu.price_per_hour("T4") == 0.40
    assert gpu.price_per_hour("B200") == gpu.price_per_hour() == 6.25
    assert gpu.price_per_hour("H100") == 4.00  # kept from the defaults


def test_remote_gpu_type_without_a_price_is_an_error(tmp_path):
    message, _ = error_of(tmp_path, "gpu: {backend: modal, type: A100}")
    assert "gpu.type" in message and "'A100'" in message and "prices_per_hour" in message
    assert load_text(tmp_path, "gpu: {backend: local, type: A100}").gpu.type == "A100"


# --------------------------------------------------------------------------- the shipped file


def test_shipped_config_matches_the_embedded_default():
    shipped = (REPO / "config.yaml").read_bytes()
    packaged = (REPO / "stemset_assets" / "config" / "default_config.yaml").read_bytes()
    assert shipped == packaged
    assert DEFAULT_CONFIG_YAML.encode("utf-8") == packaged


def test_shipped_config_contents():
    config = load_config(REPO / "config.yaml", {})
    assert config.storage.backend == "local"
    assert config.storage.local.root == REPO / "media"
    assert (config.gpu.backend, config.gpu.type, config.gpu.app) == ("local", "A100-40GB", "stemset-gpu")
    assert config.sensors.max_new_per_tick == 200
    h4n = config.profile("h4n")
    assert h4n.strategies == ("htdemucs",)
    assert (h4n.output.format, h4n.output.bitrate, h4n.output.aac_coder) == ("m4a", 192, "fast")
    stems = {name: config.strategy(name).stems for name in config.strategies}
    assert stems == {
        "htdemucs": ["drums", "bass", "other", "vocals"],
        "htdemucs_ft": ["drums", "bass", "other", "vocals"],
        "htdemucs_6s": ["drums", "bass", "other", "vocals", "guitar", "piano"],
        "vocals_guitar_piano": ["drums", "bass", "vocals", "guitar", "piano", "other"],
    }
    chained = config.strategy("vocals_guitar_piano")
    assert chained.models == ["htdemucs_ft", "htdemucs_6s"]
    assert chained.root.outputs["other"].model == "htdemucs_6s"
    params = config.strategy("htdemucs").root.params
    assert (params.shifts, params.overlap) == (1, 0.25)


def test_shipped_config_s3_section_resolves_with_r2_variables(tmp_path):
    text = (REPO / "config.yaml").read_text().replace("backend: local                 # local | s3", "backend: s3")
    env = {
        "R2_ACCOUNT_ID": "acc",
        "R2_ACCESS_KEY_ID": "k",
        "R2_SECRET_ACCESS_KEY": "s",
        "R2_PUBLIC_URL": "https://media.example.com/",
    }
    s3 = parse_config(text, path=tmp_path / "config.yaml", env=env).storage.s3
    assert s3.endpoint_url == "https://acc.r2.cloudflarestorage.com"
    assert s3.public_url == "https://media.example.com"


def test_importing_config_pulls_in_neither_dagster_nor_torch():
    code = (
        "import sys, stemset_assets, stemset_assets.config as c; c.load_config(None, {}); "
        "print(sorted(m for m in ('dagster', 'torch', 'demucs') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- fingerprints

CANONICAL = """
strategies:
  s:
    _: htdemucs_ft
    drums: drums
    bass: bass
    vocals: vocals
    other:
      _: htdemucs_6s
      guitar: guitar
      other: other
    __params: {shifts: 2, overlap: 0.25}
"""

SAME = [
    # key order and comments
    """
    strategies:
      s:   # reordered, commented
        __params: {overlap: 0.25, shifts: 2}
        other: {other: other, guitar: guitar, _: htdemucs_6s}  # the child
        vocals: vocals
        bass: bass
        _: htdemucs_ft
        drums: drums
    """,
    # defaults written out, batch size changed, the child's inherited params repeated
    """
    strategies:
      s:
        _: htdemucs_ft
        drums: drums
        bass: bass
        vocals: vocals
        other:
          _: htdemucs_6s
          guitar: guitar
          other: other
          __params: {shifts: 2, overlap: 0.25, batch_size: 3}
        __params: {shifts: 2, overlap: 0.25, segment: null, precision: fp32, batch_size: 16}
    """,
]

DIFFERENT = [
    CANONICAL.replace("shifts: 2", "shifts: 3"),
    CANONICAL.replace("_: htdemucs_ft", "_: htdemucs"),
    CANONICAL.replace("_: htdemucs_6s", "_: my_6s"),  # a released htdemucs has no guitar: an error now
    CANONICAL.replace("overlap: 0.25", "overlap: 0.5"),
    CANONICAL.replace("guitar: guitar", "guitar: gtr"),
    CANONICAL.replace("      guitar: guitar\n", "      piano: guitar\n"),
    CANONICAL.replace("__params: {shifts: 2, overlap: 0.25}", "__params: {shifts: 2, overlap: 0.25, precision: bf16}"),
]


def _fingerprint(tmp_path: Path, text: str) -> str:
    return fingerprint(load_text(tmp_path, text).strategy("s"))


def test_fingerprint_ignores_cosmetic_edits(tmp_path):
    base = _fingerprint(tmp_path, CANONICAL)
    assert base == _fingerprint(tmp_path, CANONICAL)  # stable across loads
    for variant in SAME:
        assert _fingerprint(tmp_path, variant) == base


def test_fingerprint_changes_with_what_changes_the_output(tmp_path):
    base = _fingerprint(tmp_path, CANONICAL)
    seen = {base}
    for variant in DIFFERENT:
        assert variant != CANONICAL
        value = _fingerprint(tmp_path, variant)
        assert value not in seen
        seen.add(value)


def test_fingerprint_covers_model_identities(tmp_path):
    strategy = load_text(tmp_path, CANONICAL).strategy("s")
    assert fingerprint(strategy, {"htdemucs_ft": "sig-a"}) != fingerprint(strategy, {"htdemucs_ft": "sig-b"})


def test_module_constants_are_exported():
    assert cfg.OUTPUT_FORMATS == ("wav", "flac", "opus", "m4a")
    assert cfg.GPU_BACKENDS == ("local", "modal", "http")
