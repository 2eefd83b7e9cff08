"""fileserver.analysis against a corpus whose answers are known, made at test time.

Speech by espeak-ng (several voices, rates, levels; padded with silence, in noise,
clipped), and bursts with no speech: digital silence, a dither-level hiss, tones, white,
pink and brown noise, hum, paging tones, a key-up click. Each is resampled to 16 kHz
mono by sox and encoded by ffmpeg (libmp3lame, 24 kbit/s: the Janus shape), then
analysed as the worker does. Prints the precision and recall of ``empty`` (the positive
class: a burst with no speech) and each clip's measures.

Needs the Debian packages ``espeak-ng``, ``sox`` and ``ffmpeg``: without them the test
fails and says so (it does not skip: a CI without them would never check the analysis).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from fileserver.analysis import Analysis, analyse
from tests.unit.analysis_reference import load_reference
from tests.unit.test_analysis_reference import REFERENCE_COMMIT

TOOLS = ("espeak-ng", "sox", "ffmpeg")
INSTALL = "apt-get install -y espeak-ng sox ffmpeg"


@dataclass(frozen=True)
class Clip:
    name: str
    empty: bool  # the known answer
    path: Path


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def _speech(work: Path, name: str, text: str, voice: str = "en", rate: int = 160) -> Path:
    raw = work / f"{name}.raw.wav"
    _run("espeak-ng", "-v", voice, "-s", str(rate), "-w", str(raw), text)
    out = work / f"{name}.16k.wav"
    _run("sox", "-R", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out))
    return out


def _synth(work: Path, name: str, seconds: float, *effect: str) -> Path:
    out = work / f"{name}.16k.wav"
    _run(
        "sox",
        "-R",
        "-n",
        "-r",
        "16000",
        "-c",
        "1",
        "-b",
        "16",
        str(out),
        "synth",
        str(seconds),
        *effect,
    )
    return out


def _sox(work: Path, name: str, source: Path, *effects: str) -> Path:
    out = work / f"{name}.16k.wav"
    _run("sox", "-R", str(source), str(out), *effects)
    return out


def _mix(work: Path, name: str, a: Path, b: Path) -> Path:
    out = work / f"{name}.16k.wav"
    _run("sox", "-R", "-m", str(a), str(b), str(out))
    return out


def _concat(work: Path, name: str, *parts: Path) -> Path:
    out = work / f"{name}.16k.wav"
    _run("sox", "-R", *map(str, parts), str(out))
    return out


def _mp3(wav: Path) -> Path:
    out = wav.with_name(wav.name.replace(".16k.wav", ".mp3"))
    _run(
        "ffmpeg",
        "-loglevel",
        "error",
        "-y",
        "-i",
        str(wav),
        "-ar",
        "16000",
        "-ac",
        "1",
        "-codec:a",
        "libmp3lame",
        "-b:a",
        "24k",
        str(out),
    )
    return out


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def build_corpus(work: Path) -> list[Clip]:
    """Make the labelled corpus under ``work`` (also used by bench/analysis_speed.py)."""
    work.mkdir(parents=True, exist_ok=True)
    unit = _speech(work, "unit", "Unit twelve, respond to the fire alarm at the north gate, over.")
    copy = _speech(work, "copy", "Copy that dispatch, on my way.", "en-us", 150)
    woman = _speech(
        work, "woman", "Medic four is at the scene, we need a second ambulance.", "en+f3", 175
    )
    fast = _speech(work, "fast", "Ten four, clear.", "en-gb", 220)
    german = _speech(work, "german", "Wache drei, bitte kommen.", "de", 150)
    yes = _speech(work, "yes", "yes")
    pink = _synth(work, "pinkbed", 4.5, "pinknoise", "vol", "0.05")
    wavs: list[tuple[str, bool, Path]] = [
        ("speech", False, unit),
        ("speech_us", False, copy),
        ("speech_female", False, woman),
        ("speech_fast", False, fast),
        ("speech_german", False, german),
        ("speech_one_word", False, yes),
        ("speech_padded", False, _sox(work, "padded", unit, "pad", "1.0", "0.5")),
        ("speech_quiet", False, _sox(work, "quiet", copy, "gain", "-20")),
        ("speech_clipped", False, _sox(work, "clipped", unit, "gain", "25")),
        (
            "speech_in_noise",
            False,
            _mix(work, "in_noise", _sox(work, "unit_pad", unit, "pad", "0.3", "0.3"), pink),
        ),
        ("silence", True, _synth(work, "silence", 2.0, "sine", "0", "vol", "0")),
        ("hiss_dither", True, _synth(work, "hiss", 2.0, "whitenoise", "vol", "0.001")),
        ("tone_1k", True, _synth(work, "tone1k", 2.0, "sine", "1000", "vol", "0.5")),
        ("tone_2100", True, _synth(work, "tone2100", 1.5, "sine", "2100", "vol", "0.3")),
        ("white_noise", True, _synth(work, "white", 2.0, "whitenoise", "vol", "0.3")),
        ("pink_noise", True, _synth(work, "pink", 2.0, "pinknoise", "vol", "0.3")),
        ("brown_noise", True, _synth(work, "brown", 2.0, "brownnoise", "vol", "0.3")),
        ("hum_50hz", True, _synth(work, "hum", 2.0, "square", "50", "vol", "0.2")),
        (
            "paging_tones",
            True,
            _concat(
                work,
                "paging",
                _synth(work, "tone_a", 1.0, "sine", "853", "vol", "0.4"),
                _synth(work, "tone_b", 1.0, "sine", "960", "vol", "0.4"),
            ),
        ),
        (
            "kerchunk",
            True,
            _sox(
                work,
                "kerchunk",
                _synth(work, "click", 0.08, "whitenoise", "vol", "0.5"),
                "pad",
                "0.05",
                "0.4",
            ),
        ),
    ]
    return [Clip(name, empty, _mp3(wav)) for name, empty, wav in wavs]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Clip, Analysis]]:
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"the labelled audio corpus needs {', '.join(missing)} (Debian: {INSTALL})",
            pytrace=False,
        )
    clips = build_corpus(tmp_path_factory.mktemp("corpus"))
    return [(clip, analyse(clip.path.read_bytes())) for clip in clips]


def test_empty_is_right_on_the_labelled_corpus(corpus: list[tuple[Clip, Analysis]]) -> None:
    print()
    print(
        f"{'clip':18} {'known':6} {'empty':6} {'speech':>6} {'peak':>7} {'rms':>7} "
        f"{'lead ms':>7} {'trail ms':>8} {'clipped':>8}"
    )
    for clip, a in corpus:
        print(
            f"{clip.name:18} {clip.empty!s:6} {a.empty!s:6} {a.speech_ratio:6.2f} "
            f"{a.peak_dbfs:7.1f} {a.rms_dbfs:7.1f} {a.leading_silence_ms:7d} "
            f"{a.trailing_silence_ms:8d} {a.clipped_ratio:8.4f}"
        )
    tp = sum(1 for c, a in corpus if c.empty and a.empty)
    fp = sum(1 for c, a in corpus if not c.empty and a.empty)
    fn = sum(1 for c, a in corpus if c.empty and not a.empty)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    print(
        f"empty: precision {precision:.2f} ({tp}/{tp + fp}), recall {recall:.2f} "
        f"({tp}/{tp + fn}) on {len(corpus)} clips ({tp + fn} with no speech)"
    )
    wrong = [c.name for c, a in corpus if c.empty != a.empty]
    assert not wrong, f"misjudged: {wrong}"
    assert precision == recall == 1.0


def test_the_measures_match_what_was_made(corpus: list[tuple[Clip, Analysis]]) -> None:
    a = {clip.name: analysis for clip, analysis in corpus}
    padded, plain = a["speech_padded"], a["speech"]
    assert padded.leading_silence_ms == pytest.approx(plain.leading_silence_ms + 1000, abs=100)
    assert padded.trailing_silence_ms == pytest.approx(plain.trailing_silence_ms + 500, abs=100)
    assert plain.speech_ratio > 0.6 and padded.speech_ratio < plain.speech_ratio
    assert a["speech_clipped"].clipped_ratio > 0.02 and a["speech_clipped"].peak_dbfs > -0.5
    assert all(a[n].clipped_ratio < 0.001 for n in a if n != "speech_clipped")
    assert a["speech_quiet"].peak_dbfs == pytest.approx(a["speech_us"].peak_dbfs - 20, abs=1.5)
    assert a["silence"].peak_dbfs < -80  # sox's dither: a few LSB
    assert a["tone_1k"].rms_dbfs == pytest.approx(a["tone_1k"].peak_dbfs - 3.0, abs=0.5)
    for name, analysis in a.items():
        if analysis.empty:
            assert analysis.speech_ratio == 0.0, name
            assert analysis.leading_silence_ms == analysis.decoded_ms, name


def test_every_measure_is_the_one_before_the_decode_moved_into_c(
    corpus: list[tuple[Clip, Analysis]],
) -> None:
    """Field by field, floats exactly, against fileserver/analysis.py at
    tests/unit/test_analysis_reference.py's REFERENCE_COMMIT (from git), also read from
    the spooled file."""
    reference = load_reference(REFERENCE_COMMIT)
    for clip, analysis in corpus:
        data = clip.path.read_bytes()
        expected = dataclasses.astuple(reference.analyse(data))
        assert dataclasses.astuple(analysis) == expected, (clip.name, REFERENCE_COMMIT)
        assert dataclasses.astuple(analyse(clip.path)) == expected, clip.name
