"""End to end in a real browser: Debian's headless Chromium, driven by playwright-core
(tests/browser/player.mjs), against `stemset api serve` on loopback with tiny models.

Uploads a take on the page, waits for the job, checks that the player lists every stem with a
waveform and that playback starts (the AudioContext runs and the play position advances), and
saves a screenshot to tests/artifacts/player.png. Skips only when chromium, node or the
playwright-core install (`npm ci` in tests/browser) is missing; `.ci/run` installs all three.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.api_server import api_server
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo

HERE = Path(__file__).resolve().parent
BROWSER = HERE / "browser"
ARTIFACTS = HERE / "artifacts"
CHROMIUM = os.environ.get("STEMSET_CHROMIUM", "/usr/bin/chromium")
STEMS = ["bass", "drums", "other", "vocals"]


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} not found (apt-get install chromium; .ci/run does)"
    if shutil.which("node") is None:
        return "node not found"
    if not (BROWSER / "node_modules" / "playwright-core").is_dir():
        return "playwright-core not installed (cd tests/browser && npm ci)"
    return None


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_upload_wait_and_play_in_chromium(tmp_path):
    repo = make_model_repo(tmp_path / "models")
    take = tmp_path / "Garage take 3.wav"
    write_audio(take, music_like(2.0, seed=7), 44100)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "player.png"
    shot.unlink(missing_ok=True)
    with api_server(tmp_path / "srv", repo) as server:
        env = {
            **os.environ,
            "STEMSET_URL": server.url + "/",
            "STEMSET_TOKEN": server.token or "",
            "AUDIO_FILE": str(take),
            "SCREENSHOT": str(shot),
            "CHROMIUM": CHROMIUM,
            "JOB_TIMEOUT_MS": "150000",
        }
        proc = subprocess.run(
            ["node", str(BROWSER / "player.mjs")], cwd=BROWSER, env=env, capture_output=True, text=True, timeout=240
        )
        log = server.log()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the browser script (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1])
    assert result["ok"] and proc.returncode == 0, f"{result}\n{proc.stderr[-2000:]}\n--- server log:\n{log[-3000:]}"
    assert result["statuses"][-1] == "complete" and {"running", "queued"} & set(result["statuses"])
    assert sorted(result["stems"]) == STEMS  # the player lists every stem...
    assert all(n > 100 for n in result["drawn"]), result["drawn"]  # ...each with a drawn waveform
    assert any(pk.startswith("h4n/garage_take_3-") for pk in result["listed"])  # lists the upload (content-named)
    playback = result["playback"]
    assert playback["state"] == "running" and playback["playerState"] == "playing"
    assert playback["position"] > 0.25 and playback["currentTime"] > result["t0"]  # the clock advances
    first = result["stems"][0]
    assert all((g == 1.0) == (name == first) for name, g in result["soloGains"]), result["soloGains"]
    assert all((g == 0.0) == (name == first) for name, g in result["muteGains"]), result["muteGains"]
    assert not result["errors"], result["errors"]
    assert shot.is_file() and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
    assert (server.token or "") not in log
