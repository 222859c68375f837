"""Audio and image preprocessing: shapes, signal facts checked by independent math, bad input."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from bubogpt.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    AudioDecodeError,
    AudioPreprocessConfig,
    ImageDecodeError,
    ImagePreprocessConfig,
    MediaError,
    audio_to_fbank_clips,
    decode_audio,
    decode_image,
    image_transform,
    load_audio_fbank,
    load_image,
    spec_augment,
)

torch.set_num_threads(1)

FLOAT_EPS_LOG = math.log(torch.finfo(torch.float32).eps)  # Kaldi floors mel energies at float eps


def tone(freq: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(samples: np.ndarray, sample_rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def expected_mel_bin(freq: float, num_bins: int = 128, sample_rate: int = 16000) -> int:
    """Kaldi's mel filters: HTK mel scale, centres evenly spaced in mel from 20 Hz to Nyquist."""
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    low, high = mel(20.0), mel(sample_rate / 2)
    delta = (high - low) / (num_bins + 1)
    centres = [low + (k + 1) * delta for k in range(num_bins)]
    return min(range(num_bins), key=lambda k: abs(centres[k] - mel(freq)))


def mel_profile(fbank_clips: torch.Tensor) -> torch.Tensor:
    """(clips, 1, mel, frames) -> (mel,) mean over clips and frames."""
    return fbank_clips.mean(dim=(0, 1, 3))


def top_local_peaks(profile: torch.Tensor, count: int) -> list[int]:
    p = profile.tolist()
    peaks = [i for i in range(1, len(p) - 1) if p[i] >= p[i - 1] and p[i] >= p[i + 1]]
    return sorted(peaks, key=lambda i: -p[i])[:count]


# --------------------------------------------------------------------------------------------------
# fbank clips
# --------------------------------------------------------------------------------------------------


def test_default_shape_is_clips_channel_mel_frames():
    clips = audio_to_fbank_clips(torch.from_numpy(tone(440, 7.0, 16000)), 16000)
    assert clips.shape == (7, 1, 128, 204)  # 6 clips + the global clip (use_global)
    assert clips.dtype == torch.float32


def test_exact_target_length_keeps_channel_axis_and_skips_resize():
    # 1 + (N - 400) // 160 = 204 frames  <=>  N = 400 + 203 * 160 samples: no resize is needed.
    samples = 400 + 203 * 160
    config = AudioPreprocessConfig(clip_seconds=samples / 16000, num_clips=2)
    waveform = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, samples).astype(np.float32))
    clips = audio_to_fbank_clips(waveform, 16000, config)
    assert clips.shape == (3, 1, 128, 204)  # 2 clips + the global one, here the same window
    torch.testing.assert_close(clips[2], clips[0])
    import torchaudio.compliance.kaldi as kaldi

    centred = waveform - waveform.mean()
    raw = kaldi.fbank(
        centred[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
    ).T  # (mel, frames)
    torch.testing.assert_close(clips[0, 0], (raw + 4.268) / 9.138)


def test_five_second_clip_matches_reference_resize():
    # The reference: fbank of the mean-subtracted clip, torchvision Resize to (128, 204) (bilinear,
    # without antialias under the torchvision it trained with), then (x - mean) / std.
    import torchaudio.compliance.kaldi as kaldi
    from torchvision.transforms import functional as TF

    clip = torch.from_numpy(np.random.default_rng(7).normal(0.1, 0.2, 80000).astype(np.float32))
    raw = kaldi.fbank(
        (clip - clip.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
    ).T[None]  # (1, mel, 498)
    assert raw.shape == (1, 128, 498)
    expected = (TF.resize(raw, [128, 204], antialias=False) + 4.268) / 9.138
    clips = audio_to_fbank_clips(clip, 16000, AudioPreprocessConfig(num_clips=1))
    torch.testing.assert_close(clips[0], expected)


def test_tone_energy_peaks_at_its_mel_bin():
    clips = audio_to_fbank_clips(torch.from_numpy(tone(1000, 5.0, 16000)), 16000)
    assert abs(top_local_peaks(mel_profile(clips), 1)[0] - expected_mel_bin(1000)) <= 1


def test_stereo_44k_is_mixed_down_and_resampled():
    # Left channel 700 Hz, right channel 2500 Hz, at 44.1 kHz: both tones must appear, at the bins
    # of their frequencies on the 16 kHz mel scale (a wrong rate or a dropped channel moves or
    # loses one).
    stereo = np.stack([tone(700, 6.0, 44100), tone(2500, 6.0, 44100)])
    clips = audio_to_fbank_clips(torch.from_numpy(stereo), 44100, AudioPreprocessConfig(channel="mean"))
    assert clips.shape == (7, 1, 128, 204)
    peaks = sorted(top_local_peaks(mel_profile(clips), 2))
    expected = sorted([expected_mel_bin(700), expected_mel_bin(2500)])
    assert all(abs(p - e) <= 1 for p, e in zip(peaks, expected)), (peaks, expected)


def test_log_scale_and_normalisation():
    # Amplitude x10 = power x100 = log energy + ln(100); after normalisation: + ln(100) / std.
    config = AudioPreprocessConfig(num_clips=1)
    quiet = audio_to_fbank_clips(torch.from_numpy(tone(1000, 5.0, 16000, 0.01)), 16000, config)
    loud = audio_to_fbank_clips(torch.from_numpy(tone(1000, 5.0, 16000, 0.1)), 16000, config)
    peak = expected_mel_bin(1000)
    shift = loud[0, 0, peak].mean() - quiet[0, 0, peak].mean()
    assert shift.item() == pytest.approx(math.log(100.0) / 9.138, abs=1e-3)


def test_silence_is_finite_and_equals_floored_log():
    clips = audio_to_fbank_clips(torch.zeros(2, 16000 * 3), 16000)
    assert torch.isfinite(clips).all()
    torch.testing.assert_close(clips, torch.full_like(clips, (FLOAT_EPS_LOG + 4.268) / 9.138))


def test_short_audio_is_tiled_to_one_clip():
    short = tone(523, 0.05, 16000)  # 800 samples
    clips = audio_to_fbank_clips(torch.from_numpy(short), 16000)
    tiled = np.tile(short, 100)  # 80 000 samples = exactly 5 s
    expected = audio_to_fbank_clips(torch.from_numpy(tiled), 16000)
    assert clips.shape == (7, 1, 128, 204)
    torch.testing.assert_close(clips, expected)
    torch.testing.assert_close(clips[0], clips[6])  # one 5 s window: every clip is the same


def test_inference_clips_are_evenly_spaced_and_deterministic():
    rng = np.random.default_rng(1)
    audio = rng.normal(0, 0.2, 17 * 16000).astype(np.float32)
    clips = audio_to_fbank_clips(torch.from_numpy(audio), 16000)
    torch.testing.assert_close(clips, audio_to_fbank_clips(torch.from_numpy(audio), 16000))
    one = AudioPreprocessConfig(num_clips=1)
    starts = np.linspace(0, len(audio) - 80000, 6)  # first at 0, last ending at the end
    for i, start in enumerate(starts.astype(int)):
        segment = torch.from_numpy(audio[start : start + 80000])
        torch.testing.assert_close(clips[i], audio_to_fbank_clips(segment, 16000, one)[0])


def test_training_clips_are_random_but_reproducible():
    audio = torch.from_numpy(np.random.default_rng(2).normal(0, 0.2, 20 * 16000).astype(np.float32))
    a = audio_to_fbank_clips(audio, 16000, train=True, generator=torch.Generator().manual_seed(0))
    b = audio_to_fbank_clips(audio, 16000, train=True, generator=torch.Generator().manual_seed(0))
    c = audio_to_fbank_clips(audio, 16000, train=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # Audio exactly one clip long leaves one possible window: without stripes, train == eval.
    no_stripes = AudioPreprocessConfig(time_stripes=0, freq_stripes=0)
    exact = audio[:80000]
    torch.testing.assert_close(
        audio_to_fbank_clips(exact, 16000, no_stripes, train=True, generator=torch.Generator()),
        audio_to_fbank_clips(exact, 16000, no_stripes),
    )


@pytest.mark.parametrize("shape,rate", [((16000 * 6,), 16000), ((2, 22050 * 6), 22050)])
def test_input_waveform_is_not_mutated(shape, rate):
    waveform = torch.rand(shape) * 0.5 + 0.3  # a DC offset the clip-mean subtraction must remove
    before = waveform.clone()
    audio_to_fbank_clips(waveform, rate)
    audio_to_fbank_clips(waveform, rate, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(waveform, before)


def test_long_audio_and_length_guard():
    long = torch.from_numpy(np.random.default_rng(3).normal(0, 0.1, 8000 * 200).astype(np.float32))
    clips = audio_to_fbank_clips(long, 8000)  # 200 s at 8 kHz
    assert clips.shape == (7, 1, 128, 204) and torch.isfinite(clips).all()
    with pytest.raises(MediaError, match="more than 100"):
        audio_to_fbank_clips(long, 8000, AudioPreprocessConfig(max_seconds=100))


def test_bad_waveforms_are_refused():
    with pytest.raises(MediaError, match="zero length"):
        audio_to_fbank_clips(torch.zeros(1, 0), 16000)
    with pytest.raises(MediaError, match="NaN"):
        audio_to_fbank_clips(torch.tensor([0.0, float("nan")] * 500), 16000)


# --------------------------------------------------------------------------------------------------
# SpecAugment
# --------------------------------------------------------------------------------------------------


def test_spec_augment_replace_copies_stripes_from_other_clips():
    clips = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 30).contiguous()  # clip c is all c
    before = clips.clone()
    out = spec_augment(clips, torch.Generator().manual_seed(0), 10, 2, 5, 2, mode="replace")
    assert torch.equal(clips, before)
    again = spec_augment(clips, torch.Generator().manual_seed(0), 10, 2, 5, 2, mode="replace")
    torch.testing.assert_close(out, again)
    changed_total = 0
    for c in range(4):
        changed = out[c, 0] != c  # (mel, frames)
        changed_total += int(changed.sum())
        # every changed value came from another clip of the sample
        assert set(out[c, 0][changed].tolist()) <= {0.0, 1.0, 2.0, 3.0} - {float(c)}
        # changed positions are whole time stripes (columns) and whole mel stripes (rows)
        cols, rows = changed.all(dim=0), changed.all(dim=1)
        assert torch.equal(changed, cols[None, :] | rows[:, None])
        assert int(cols.sum()) <= 2 * 9 and int(rows.sum()) <= 2 * 4
    assert changed_total > 0


def test_spec_augment_single_clip_fills_with_zero():
    clips = torch.full((1, 1, 16, 30), 3.0)
    out = spec_augment(clips, torch.Generator().manual_seed(4), 10, 2, 5, 2, mode="replace")
    assert set(out.unique().tolist()) <= {0.0, 3.0} and (out == 0).any()


# --------------------------------------------------------------------------------------------------
# decode_audio
# --------------------------------------------------------------------------------------------------


def test_decode_wav_round_trip_from_bytes_and_path(tmp_path):
    stereo = np.stack([tone(440, 1.0, 22050), tone(880, 1.0, 22050)], axis=1)  # (N, 2)
    data = encode(stereo, 22050, "WAV", "PCM_16")
    waveform, rate = decode_audio(data)
    assert rate == 22050 and waveform.shape == (2, 22050) and waveform.dtype == torch.float32
    np.testing.assert_allclose(waveform.numpy(), stereo.T, atol=1 / 32768 + 1e-6)
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    from_path, _ = decode_audio(path)
    assert torch.equal(from_path, waveform)
    assert torch.equal(decode_audio(str(path))[0], waveform)


@pytest.mark.parametrize(
    "fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_decode_compressed_formats(fmt, subtype):
    samples = tone(1000, 2.0, 16000)
    waveform, rate = decode_audio(encode(samples, 16000, fmt, subtype))
    assert rate == 16000 and waveform.shape[0] == 1
    assert abs(waveform.shape[1] - 32000) <= 2000  # lossy codecs add or drop a little padding
    clips = audio_to_fbank_clips(waveform, rate)
    assert abs(top_local_peaks(mel_profile(clips), 1)[0] - expected_mel_bin(1000)) <= 1


def test_load_audio_fbank_matches_the_two_steps():
    data = encode(tone(300, 3.0, 16000), 16000, "FLAC")
    waveform, rate = decode_audio(data)
    torch.testing.assert_close(load_audio_fbank(data), audio_to_fbank_clips(waveform, rate))


def test_bad_audio_raises_media_error(tmp_path):
    good_flac = encode(tone(440, 2.0, 16000), 16000, "FLAC")
    good_wav = encode(tone(440, 2.0, 16000), 16000, "WAV", "PCM_16")
    cases = {
        b"": "empty",
        b"this is not audio at all" * 20: "not a readable audio file",
        good_flac[: len(good_flac) // 2]: "corrupt or truncated",
        good_wav[: len(good_wav) // 2]: "truncated",
        encode(np.zeros((0, 1), np.float32), 16000, "WAV"): "zero length",
        encode(np.array([0.0, np.nan, 0.1] * 100, np.float32), 16000, "WAV", "FLOAT"): "NaN",
        encode(tone(440, 3.0, 16000), 16000, "FLAC"): "more than 2",
    }
    for data, message in cases.items():
        with pytest.raises(AudioDecodeError, match=message):
            decode_audio(data, max_seconds=2.5 if message != "more than 2" else 2.0)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with pytest.raises(MediaError, match="not a readable audio file"):
        decode_audio(png.getvalue())
    with pytest.raises(MediaError, match="not found") as info:
        decode_audio(tmp_path / "missing.flac")
    assert "missing.flac" in str(info.value)
    assert issubclass(AudioDecodeError, ValueError)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def image_bytes(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def two_halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def test_exif_orientation_is_applied():
    stored = two_halves(40, 20)
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored left edge -> top
    image = decode_image(image_bytes(stored, "JPEG", quality=95, exif=exif))
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # top: red
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60  # bottom: blue


def test_modes_are_converted_to_rgb():
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (255, 0, 0, 128), (0, 0, 0, 255)])
    pixels = np.asarray(decode_image(image_bytes(rgba, "PNG"))).astype(int)
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]  # fully transparent -> white background
    assert abs(pixels[0, 2, 1] - 127) <= 2 and pixels[0, 2, 0] == 255  # half-transparent: pink
    assert pixels[0, 3].tolist() == [0, 0, 0]

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    decoded = decode_image(image_bytes(palette, "PNG"))
    assert decoded.mode == "RGB"
    assert np.asarray(decoded).tolist() == [[[10, 20, 30], [200, 100, 50]]]

    grey = decode_image(image_bytes(Image.new("L", (3, 3), 100), "PNG"))
    assert grey.mode == "RGB" and (np.asarray(grey) == 100).all()

    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])  # white, cyan
    pixels = np.asarray(decode_image(image_bytes(cmyk, "TIFF"))).tolist()
    assert pixels == [[[255, 255, 255], [0, 255, 255]]]

    grey_alpha = Image.new("LA", (1, 1), (0, 0))  # black but fully transparent
    assert np.asarray(decode_image(image_bytes(grey_alpha, "PNG"))).tolist() == [[[255, 255, 255]]]

    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))  # 16-bit greyscale
    assert np.asarray(decode_image(image_bytes(deep, "PNG")))[0, :, 0].tolist() == [0, 255]


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim width x height (CRC fixed)."""
    data = bytearray(image_bytes(Image.new("L", (1, 1)), "PNG"))
    ihdr_data = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr_data
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr_data))
    return bytes(data)


def test_decompression_bombs_are_refused():
    with pytest.raises(ImageDecodeError, match="decompression-bomb guard"):
        decode_image(png_with_header_size(5000, 5000), max_pixels=1_000_000)
    # Beyond PIL's own limit PIL raises first; that must still come out as our error.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png_with_header_size(40000, 40000), max_pixels=10**12)


def test_bad_images_raise_media_error(tmp_path):
    jpeg = image_bytes(two_halves(64, 64), "JPEG", quality=95)
    cases = {
        b"": "empty",
        b"\x00garbage bytes, not an image" * 10: "not a recognised image format",
        jpeg[: len(jpeg) // 2]: "truncated",
        encode(tone(440, 0.5, 16000), 16000, "WAV"): "not a recognised image format",
    }
    for data, message in cases.items():
        with pytest.raises(ImageDecodeError, match=message):
            decode_image(data)
    with pytest.raises(MediaError, match="not found"):
        decode_image(tmp_path / "nope.jpg")
    assert issubclass(ImageDecodeError, ValueError)


def test_eval_transform_squashes_the_whole_image_and_normalises():
    image = Image.new("RGB", (672, 224), (255, 0, 0))
    image.paste((0, 255, 0), (224, 0, 448, 224))  # thirds: red | green | blue
    image.paste((0, 0, 255), (448, 0, 672, 224))
    tensor = image_transform(ImagePreprocessConfig(eval_resize="squash"), train=False)(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32

    def normalised(rgb):
        return torch.tensor([(c - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])

    # Nothing is cropped away: each third survives as a third of the width (away from the seams).
    for third, rgb in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1)]):
        columns = slice(third * 75 + 8, third * 75 + 66)
        torch.testing.assert_close(
            tensor[:, :, columns], normalised(rgb)[:, None, None].expand(3, 224, 58), atol=2e-2, rtol=0
        )

    small = image_transform(ImagePreprocessConfig(image_size=32, eval_resize="squash"))(two_halves(90, 60))
    assert small.shape == (3, 32, 32)


def test_train_transform_random_crops():
    pixels = np.random.default_rng(5).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    transform = image_transform(ImagePreprocessConfig(image_size=48), train=True)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    b = transform(image)
    c = transform(image)
    assert a.shape == (3, 48, 48)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_load_image_from_path(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(image_bytes(Image.new("RGB", (50, 40), (0, 0, 255)), "PNG"))
    tensor = load_image(path, ImagePreprocessConfig(image_size=16))
    assert tensor.shape == (3, 16, 16)
    torch.testing.assert_close(tensor[2], torch.full((16, 16), (1 - CLIP_MEAN[2]) / CLIP_STD[2]))


# --------------------------------------------------------------------------------------------------
# Fidelity to what the released 7B/13B weights were trained with (the original's files and lines)
# --------------------------------------------------------------------------------------------------


def test_first_channel_is_what_the_original_fbank_read():
    # Original: waveform2melspec hands the whole (channels, samples) clip to kaldi.fbank
    # (imagebind/data/data_utils.py:33-44), whose channel=-1 default reads channel 0
    # (torchaudio/compliance/kaldi.py:135-137). Checked against that call itself, stereo in.
    import torchaudio.compliance.kaldi as kaldi

    stereo = torch.from_numpy(np.stack([tone(700, 5.0, 16000), tone(2500, 5.0, 16000, 0.3)]))
    reference = stereo - stereo.mean()  # the original's in-place `waveform -= waveform.mean()`
    raw = kaldi.fbank(
        reference, htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
    ).T[None]
    from torchvision.transforms import functional as TF

    expected = (TF.resize(raw, [128, 204], antialias=False) + 4.268) / 9.138
    clips = audio_to_fbank_clips(stereo, 16000, AudioPreprocessConfig(num_clips=1, global_clip=False))
    torch.testing.assert_close(clips[0], expected, atol=1e-4, rtol=0)
    # ... so the right channel's 2500 Hz tone is not heard; the mean of the channels hears both.
    peaks = top_local_peaks(mel_profile(clips), 1)
    assert abs(peaks[0] - expected_mel_bin(700)) <= 1
    mean = audio_to_fbank_clips(stereo, 16000, AudioPreprocessConfig(num_clips=1, global_clip=False, channel="mean"))
    assert mel_profile(mean)[expected_mel_bin(2500)] > mel_profile(clips)[expected_mel_bin(2500)] + 1.0


def test_global_clip_is_the_whole_audio_resized_and_comes_last():
    # Original: use_global appends the whole (resampled, tiled) waveform as one more clip
    # (imagebind_audio_processor.py:105-106), whose ~1700 frames waveform2melspec resizes to 204
    # (imagebind/data/data_utils.py:63-67); every 7B/13B config sets use_global: True
    # (train_configs/mmgpt4_stage1_audio.yaml:20, mmgpt4_stage2_mm.yaml:57, eval_configs/mmgpt4_eval.yaml:41).
    import torchaudio.compliance.kaldi as kaldi
    from torchvision.transforms import functional as TF

    audio = torch.from_numpy(np.random.default_rng(11).normal(0, 0.2, 17 * 16000).astype(np.float32))
    clips = audio_to_fbank_clips(audio, 16000, AudioPreprocessConfig(num_clips=6, global_clip=True))
    assert clips.shape == (7, 1, 128, 204)
    raw = kaldi.fbank(
        (audio - audio.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
    ).T[None]  # (1, 128, 1698)
    expected = (TF.resize(raw, [128, 204], antialias=False) + 4.268) / 9.138
    torch.testing.assert_close(clips[6], expected, atol=1e-4, rtol=0)
    without = audio_to_fbank_clips(audio, 16000, AudioPreprocessConfig(num_clips=6, global_clip=False))
    torch.testing.assert_close(clips[:6], without)
    assert AudioPreprocessConfig(num_clips=6).total_clips == 7


def test_spec_augment_mixture_blends_half_and_half():
    # Original: mask_type 'mixture' (imagebind_audio_processor.py:92) = MixStripes: each stripe
    # becomes 0.5 * itself + 0.5 * the same region of a shuffled clip (audio_augment.py:84-100).
    clips = torch.tensor([0.0, 4.0, 8.0, 16.0]).view(4, 1, 1, 1).expand(4, 1, 16, 30).contiguous()
    changed_total = 0
    for seed in range(5):
        out = spec_augment(clips, torch.Generator().manual_seed(seed), 10, 1, 5, 0, mode="mixture")
        for c, value in enumerate([0.0, 4.0, 8.0, 16.0]):
            changed = out[c, 0] != value
            changed_total += int(changed.sum())
            # halfway to another clip's value, never that value itself (as "replace" would give)
            assert set(out[c, 0][changed].tolist()) <= {(value + d) / 2 for d in (0.0, 4.0, 8.0, 16.0) if d != value}
            cols = changed.all(dim=0)
            assert torch.equal(changed, cols[None, :].expand_as(changed))  # whole time stripes
    assert changed_total > 0
    # The config's default is the original's, and audio_to_fbank_clips applies it at training.
    assert AudioPreprocessConfig().spec_augment == "mixture"


def test_eval_transform_resizes_then_centre_crops_like_the_original():
    # Original: the eval processor imagebind_vision_eval (eval_configs/mmgpt4_eval.yaml:33) is
    # Resize(image_size, bicubic) then CenterCrop(image_size) (imagebind_vision_processor.py:124-133).
    image = Image.new("RGB", (672, 224), (255, 0, 0))
    image.paste((0, 255, 0), (224, 0, 448, 224))  # thirds: red | green | blue
    image.paste((0, 0, 255), (448, 0, 672, 224))
    tensor = image_transform(ImagePreprocessConfig(), train=False)(image)  # the default
    green = torch.tensor([(c - m) / s for c, m, s in zip((0, 1, 0), CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(tensor, green[:, None, None].expand(3, 224, 224), atol=2e-2, rtol=0)
    # A portrait image: the short side goes to the size, the middle of the long side is kept.
    tall = Image.new("RGB", (100, 300), (0, 0, 255))
    tall.paste((255, 0, 0), (0, 100, 100, 200))  # red middle third
    out = image_transform(ImagePreprocessConfig(image_size=50))(tall)
    red = torch.tensor([(c - m) / s for c, m, s in zip((1, 0, 0), CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(out[:, 5:45], red[:, None, None].expand(3, 40, 50), atol=2e-2, rtol=0)


def test_presets_choose_the_original_preprocessing_and_tiny_keeps_its_own():
    from bubogpt.config import bubogpt_7b, bubogpt_13b, tiny

    for preset in (bubogpt_7b(), bubogpt_13b()):
        audio, image = AudioPreprocessConfig.for_model(preset), ImagePreprocessConfig.for_model(preset)
        assert (audio.channel, audio.global_clip, audio.spec_augment) == ("first", True, "mixture")
        assert (audio.num_clips, audio.total_clips, image.image_size, image.eval_resize) == (6, 7, 224, "center_crop")
    small = tiny()
    audio, image = AudioPreprocessConfig.for_model(small), ImagePreprocessConfig.for_model(small)
    assert (audio.channel, audio.global_clip, audio.spec_augment) == ("mean", False, "replace")
    assert (audio.total_clips, image.image_size, image.eval_resize) == (3, 112, "squash")
    assert AudioPreprocessConfig.for_model(small, max_seconds=9.0).max_seconds == 9.0
