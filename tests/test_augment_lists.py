"""Stage 0 (prepare_augment): MUSAN / RIRS_NOISES lists, channel 0 of multichannel RIRs, download resume, checksum."""

from __future__ import annotations

import hashlib
import http.server
import io
import subprocess
import tarfile
import threading
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from conftest import REPO, SR, TINY, recipe_hparams, stage_script
from qmargin_spk.data import download
from qmargin_spk.data.augment import WaveformAugmenter
from qmargin_spk.data.augment_lists import AugmentListError, read_list, rirs_noises_lists, write_augment_lists
from qmargin_spk.data.download import DownloadError, fetch, unpack


def _wav(path: Path, samples: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, SR, subtype="FLOAT")
    return path


def _noise(seconds: float, seed: int, channels: int = 1) -> np.ndarray:
    data = 0.1 * np.random.default_rng(seed).standard_normal((int(seconds * SR), channels))
    return data[:, 0] if channels == 1 else data


def _rir(seed: int, channels: int = 1) -> np.ndarray:
    decay = np.exp(-np.arange(1600) / 300.0)[:, None]
    data = decay * np.random.default_rng(seed).standard_normal((1600, channels))
    return data[:, 0] if channels == 1 else data


@pytest.fixture
def corpora(tmp_path):
    """Tiny MUSAN and RIRS_NOISES trees in their published layouts; returns (musan, rirs, expected lists)."""
    musan = tmp_path / "musan"
    noise = [_wav(musan / "noise/free-sound/noise-free-sound-0000.wav", _noise(0.3, 1))]
    noise.append(_wav(musan / "noise/sound-bible/noise-sound-bible-0000.wav", _noise(0.3, 2)))
    music = [_wav(musan / "music/fma/music-fma-0000.wav", _noise(0.3, 3))]
    speech = [_wav(musan / "speech/librivox/speech-librivox-0000.wav", _noise(0.3, 4))]
    (musan / "README").write_text("not audio\n")

    rirs = tmp_path / "RIRS_NOISES"
    simulated = [
        _wav(rirs / "simulated_rirs/largeroom/Room001/Room001-00001.wav", _rir(5)),
        _wav(rirs / "simulated_rirs/mediumroom/Room002/Room002-00001.wav", _rir(6)),
        _wav(rirs / "simulated_rirs/smallroom/Room003/Room003-00001.wav", _rir(7)),
    ]
    (rirs / "simulated_rirs/smallroom/rir_list").write_text("--rir-id s --room-id r Room003/Room003-00001.wav\n")
    real_folder = rirs / "real_rirs_isotropic_noises"
    real = [
        _wav(real_folder / "RVB2014_type1_rir_largeroom1_near_angla.wav", _rir(8, channels=2)),
        _wav(real_folder / "air_type1_air_binaural_lecture_0_1.wav", _rir(9)),
    ]
    isotropic = [
        _wav(real_folder / "RVB2014_type1_noise_largeroom1_1.wav", _noise(0.4, 10, channels=2)),
        _wav(real_folder / "RWCP_type2_noise_circle_ane_1.wav", _noise(0.4, 11)),
    ]
    (real_folder / "rir_list").write_text(
        "--rir-id largeroom1_near_angla --room-id largeroom1 RIRS_NOISES/real_rirs_isotropic_noises/"
        "RVB2014_type1_rir_largeroom1_near_angla.wav\n"
        "\n"
        "--rir-id air_lecture --room-id air_lecture RIRS_NOISES/real_rirs_isotropic_noises/"
        "air_type1_air_binaural_lecture_0_1.wav\n"
        "--rir-id gone --room-id gone RIRS_NOISES/real_rirs_isotropic_noises/RWCP_type1_rir_gone.wav\n"
    )
    (real_folder / "noise_list").write_text("--noise-id n --noise-type isotropic RVB2014_type1_noise_largeroom1_1.wav")
    pointsource = [_wav(rirs / "pointsource_noises/noise-free-sound-0001.wav", _noise(0.3, 12))]
    expected = {
        "noise": noise,
        "music": music,
        "speech": speech,
        "rir": [*simulated, *real],
        "rirs_noises_noise": [*sorted(isotropic), *pointsource],
    }
    return musan, rirs, expected


def _lines(path: Path) -> list[Path]:
    return [Path(line) for line in path.read_text().splitlines()]


def test_lists_from_musan_and_rirs_noises_keep_noises_out_of_the_rirs(corpora, tmp_path):
    musan, rirs, expected = corpora
    lists = write_augment_lists(tmp_path / "out", musan=musan, rirs=rirs)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["babble.list", "music.list", "noise.list", "rir.list"]
    assert _lines(out / "noise.list") == expected["noise"]
    assert _lines(out / "music.list") == expected["music"]
    assert _lines(out / "babble.list") == expected["speech"]
    assert _lines(out / "rir.list") == expected["rir"]
    assert all(path.is_absolute() for path in _lines(out / "rir.list"))
    assert not any("noise" in path.name for path in _lines(out / "rir.list"))
    assert lists.left_out == {
        "isotropic noises (MUSAN gives the noise)": 2,
        "point-source noises (MUSAN gives the noise)": 1,
        "rir_list entries not found": 1,
    }
    assert f"{out / 'rir.list'}: 5 files" in lists.report()
    # the folder holding the corpora is accepted as well (an archive unpacked into it)
    assert rirs_noises_lists(tmp_path).rirs == expected["rir"]


def test_rirs_noises_alone_lists_its_noises_as_noise(corpora, tmp_path):
    _, rirs, expected = corpora
    write_augment_lists(tmp_path / "out", rirs=rirs)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["noise.list", "rir.list"]
    assert _lines(tmp_path / "out" / "noise.list") == expected["rirs_noises_noise"]
    assert _lines(tmp_path / "out" / "rir.list") == expected["rir"]


def test_augmenter_reads_the_lists_and_takes_only_rirs_from_an_rirs_noises_folder(corpora, tmp_path):
    musan, rirs, expected = corpora
    write_augment_lists(tmp_path / "out", musan=musan, rirs=rirs)
    augment = WaveformAugmenter(lists_dir=tmp_path / "out")
    assert augment.noise == {name: expected[name] for name in ("noise", "music", "speech")}
    assert augment.rirs == expected["rir"]
    assert WaveformAugmenter(rir_dir=rirs).rirs == expected["rir"], "RIRS_NOISES' noises are not impulse responses"
    only_rirs = WaveformAugmenter(rir_list=tmp_path / "out" / "rir.list", lists_dir=tmp_path / "not-run")
    assert only_rirs.noise == {} and only_rirs.rirs == expected["rir"]
    with pytest.raises(ValueError, match="give one"):
        WaveformAugmenter(noise_dir=musan, lists_dir=tmp_path / "out")


def test_the_settings_read_the_lists_stage_0_wrote_under_the_data_folder(corpora, tmp_path):
    musan, rirs, expected = corpora
    write_augment_lists(tmp_path / "data" / "augment", musan=musan, rirs=rirs)
    augment = recipe_hparams({**TINY, "data_folder": str(tmp_path / "data")})["augment"]
    assert augment.rirs == expected["rir"] and augment.noise["speech"] == expected["speech"]


def test_bad_lists_name_the_file_and_line(corpora, tmp_path):
    listed = tmp_path / "noise.list"
    listed.write_text(f"{corpora[2]['noise'][0]}\n{tmp_path / 'missing.wav'}\n")
    with pytest.raises(AugmentListError, match=r"noise\.list:2: no such file"):
        read_list(listed)
    (corpora[1] / "real_rirs_isotropic_noises" / "rir_list").write_text("--rir-id a --room-id b\n")
    with pytest.raises(AugmentListError, match=r"rir_list:1: no file named"):
        rirs_noises_lists(corpora[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AugmentListError, match="none of noise.list"):
        WaveformAugmenter(lists_dir=tmp_path / "empty")


def test_a_multichannel_rir_reverberates_with_its_channel_zero(tmp_path):
    rir = 0.2 * _rir(3, channels=2)
    rir[25, 0], rir[0, 1] = 1.0, 1.0  # the direct path of channel 0 at sample 25, channel 1 at 0
    path = _wav(tmp_path / "rir2ch.wav", rir)
    (tmp_path / "rir.list").write_text(f"{path}\n")
    clean = _noise(0.25, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped RIR would warn: reverberation must not silently disappear
        wet = WaveformAugmenter(rir_list=tmp_path / "rir.list", reverb_prob=1.0, noise_prob=0.0)(
            torch.from_numpy(clean).float()[None]
        )[0].double()
    channel = soundfile.read(path, dtype="float32")[0][:, 0].astype(np.float64)
    channel /= np.linalg.norm(channel)
    direct = int(np.abs(channel).argmax())
    hand = np.convolve(clean.astype(np.float32).astype(np.float64), channel)[direct : direct + len(clean)]
    hand *= np.linalg.norm(clean) / np.linalg.norm(hand)
    assert direct == 25
    np.testing.assert_allclose(wet.numpy(), hand, atol=2e-5)


def test_a_multichannel_noise_file_is_mixed_from_channel_zero(tmp_path):
    noise = np.zeros((SR, 2))
    noise[:, 1] = _noise(1.0, 5)  # channel 1 loud, channel 0 silent: a silent mix leaves the speech as it is
    path = _wav(tmp_path / "iso.wav", noise)
    (tmp_path / "noise.list").write_text(f"{path}\n")
    clean = torch.from_numpy(_noise(0.5, 6)).float()[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noisy = WaveformAugmenter(noise_list=tmp_path / "noise.list", noise_prob=1.0, seed=0)(clean)
    assert torch.equal(noisy, clean)


class _Server(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    cut_first_after: int | None
    ranges: list[str | None]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with Range support; the first response may stop after ``cut_first_after`` bytes."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        data = server.files.get(self.path)
        requested = self.headers.get("Range")
        server.ranges.append(requested)
        if data is None:
            self.send_error(404)
            return
        start = int(requested.split("=")[1].rstrip("-")) if requested else 0
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.cut_first_after is not None and len(server.ranges) == 1:
            body = body[: server.cut_first_after]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.cut_first_after, httpd.ranges = {}, None, []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _archive() -> bytes:
    """A small musan.tar.gz: musan/noise/a.wav, musan/music/b.wav and musan/speech/c.wav."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, seed in (("musan/noise/a.wav", 1), ("musan/music/b.wav", 2), ("musan/speech/c.wav", 3)):
            wav = io.BytesIO()
            soundfile.write(wav, _noise(0.5, seed), SR, format="WAV", subtype="PCM_16")
            info = tarfile.TarInfo(name)
            info.size = len(wav.getvalue())
            tar.addfile(info, io.BytesIO(wav.getvalue()))
    return buffer.getvalue()


def test_an_interrupted_download_resumes_with_a_range_request_and_unpacks(server, tmp_path):
    payload = _archive()
    server.files["/musan.tar.gz"] = payload
    server.cut_first_after = 1000
    url = f"http://127.0.0.1:{server.server_port}/musan.tar.gz"
    target = fetch(url, tmp_path / "musan.tar.gz", "md5", hashlib.md5(payload).hexdigest(), wait=lambda _: None)
    assert server.ranges == [None, "bytes=1000-"]
    assert target.read_bytes() == payload and not (tmp_path / "musan.tar.gz.part").exists()
    musan = unpack(target, tmp_path / "corpora", "musan")
    assert sorted(p.relative_to(musan).as_posix() for p in musan.rglob("*.wav")) == [
        "music/b.wav",
        "noise/a.wav",
        "speech/c.wav",
    ]

    # a partial file left by an earlier run: only the rest is requested
    server.ranges.clear()
    server.cut_first_after = None
    (tmp_path / "again.tar.gz.part").write_bytes(payload[:700])
    digest = hashlib.sha256(payload).hexdigest()
    fetch(url, tmp_path / "again.tar.gz", "sha256", digest, wait=lambda _: None)
    assert server.ranges == ["bytes=700-"] and (tmp_path / "again.tar.gz").read_bytes() == payload
    server.ranges.clear()
    fetch(url, tmp_path / "again.tar.gz", "sha256", digest)
    assert server.ranges == [], "a verified archive is not fetched again"


def test_a_zip_unpacks_into_place_and_nothing_else_is_left(corpora, tmp_path):
    rirs = corpora[1]
    archive = tmp_path / "rirs_noises.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(rirs.rglob("*")):
            handle.write(path, path.relative_to(rirs.parent).as_posix())
    unpacked = unpack(archive, tmp_path / "dl", "RIRS_NOISES")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["RIRS_NOISES"]
    assert [p.relative_to(unpacked) for p in rirs_noises_lists(unpacked).rirs] == [
        p.relative_to(rirs) for p in corpora[2]["rir"]
    ]
    with pytest.raises(DownloadError, match="no top folder musan/"):
        unpack(archive, tmp_path / "dl2", "musan")


def test_a_checksum_mismatch_is_refused_in_one_line(server, corpora, tmp_path, capsys):
    server.files["/resources/17/musan.tar.gz"] = _archive()  # not the published MUSAN: its MD5 differs
    main = stage_script("prepare_augment")
    argv = ["--out", str(tmp_path / "out"), "--rirs", str(corpora[1]), "--download", str(tmp_path / "dl")]
    assert main([*argv, "--mirror", f"http://127.0.0.1:{server.server_port}"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "MD5 of the download is" in error
    assert "0c472d4fc0c5141eca47ad1ffeb2a7df" in error and "/resources/17/musan.tar.gz" in error
    assert not any((tmp_path / "dl").iterdir()), "the mismatching file is removed, nothing unpacked"
    assert not (tmp_path / "out").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"http://127.0.0.1:{server.server_port}/none.zip", tmp_path / "none.zip", "md5", "0" * 32)


def test_stage_0_downloads_what_is_not_given_and_lists_it(server, corpora, tmp_path, monkeypatch):
    payload = _archive()
    server.files["/resources/17/musan.tar.gz"] = payload
    published = download.PUBLISHED["musan"].on_mirror(f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setitem(download.PUBLISHED, "musan", replace(published, digest=hashlib.md5(payload).hexdigest()))
    argv = ["--out", str(tmp_path / "out"), "--rirs", str(corpora[1]), "--download", str(tmp_path / "dl")]
    assert stage_script("prepare_augment")(argv) == 0
    assert _lines(tmp_path / "out" / "noise.list") == [tmp_path / "dl" / "musan" / "noise" / "a.wav"]
    assert _lines(tmp_path / "out" / "babble.list") == [tmp_path / "dl" / "musan" / "speech" / "c.wav"]
    assert _lines(tmp_path / "out" / "rir.list") == corpora[2]["rir"]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["musan", "musan.tar.gz"]


def test_run_sh_stage_0_writes_the_lists_under_the_experiment(corpora, tmp_path):
    musan, rirs, expected = corpora
    exp = tmp_path / "exp dir"
    result = subprocess.run(
        ["bash", str(REPO / "recipes/voxceleb/run.sh"), "--stage", "0", "--stop_stage", "0", "--exp", str(exp)]
        + ["--musan", str(musan), "--rirs", str(rirs)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _lines(exp / "data/augment/rir.list") == expected["rir"]
    assert "rir.list: 5 files" in result.stdout
