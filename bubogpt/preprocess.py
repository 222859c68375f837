"""Audio and image preprocessing: encoded bytes -> the tensors the encoders read.

Audio (ImageBind recipe, as BuboGPT trained it):

    bytes --decode_audio--> (channels, samples) float32, sample rate
          --audio_to_fbank_clips--> (total_clips, 1, num_mel_bins, target_length)

    1. one channel: the first (`channel="first"`, as the released model was trained: the
       reference hands the (channels, samples) waveform to kaldi.fbank, which reads channel 0) or
       the mean of the channels (`channel="mean"`); resample to 16 kHz (torchaudio.functional.resample);
    2. audio shorter than one clip (5 s) is tiled until it fills the clip;
    3. choose `num_clips` clips of 5 s: evenly spaced over the audio at inference (the first
       starts at 0, the last ends at the end), uniformly random at training; with `global_clip`,
       one more clip: the whole (tiled) audio, whose fbank is resized to the clip's frames like the
       others (the reference's `use_global`);
    4. per clip: subtract the clip's mean, Kaldi fbank (Hanning, 25 ms / 10 ms, 128 mel bins, dither
       0, HTK compatible) -> (frames, mel), transpose to (mel, frames), bilinear resize of the ~498
       frames of a 5 s clip to 204, normalise with (x - mean) / std;
    5. training only: SpecAugment stripes (`spec_augment`), blended 50/50 with another clip of the
       sample (`"mixture"`, the reference's) or replaced by it (`"replace"`).

    `AudioPreprocessConfig.for_model(model_config)` takes these choices from a `BuboGPTConfig`.

    Unlike the reference, the input waveform is never modified in place, and every clip keeps its
    channel axis whatever its frame count (the reference dropped it for an exact 204-frame input).
    Clips are always resized (also when they have fewer frames than the target, where ImageBind
    zero-padded): with tiling to the clip length this only differs for non-default clip lengths.

Image (BLIP-2 / CLIP recipe):

    bytes --decode_image--> RGB PIL image (EXIF orientation applied, alpha composited on white)
          --image_transform(config, train)--> (3, image_size, image_size) float32, CLIP-normalised

    Inference: bicubic resize of the short side, then a centre crop (`eval_resize="center_crop"`,
    the reference's eval processor), or of the whole image to a square (`"squash"`).

Bad input (empty, garbage, corrupt, truncated, too long, too many pixels) raises `MediaError`, a
`ValueError` whose message names the source and the problem.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from bubogpt.config import BuboGPTConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MediaSource = bytes | bytearray | memoryview | str | Path


class MediaError(ValueError):
    """An audio or image input that cannot be used; the message names the source and the problem."""


class AudioDecodeError(MediaError):
    pass


class ImageDecodeError(MediaError):
    pass


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@dataclass
class AudioPreprocessConfig:
    """Defaults are the released model's (ImageBind-H audio trunk as BuboGPT used it)."""

    sample_rate: int = 16000
    clip_seconds: float = 5.0
    num_clips: int = 6
    num_mel_bins: int = 128
    target_length: int = 204  # fbank frames per clip after the bilinear resize
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    mean: float = -4.268  # fbank statistics ImageBind was trained with
    std: float = 9.138
    max_seconds: float = 600.0  # longer inputs are refused (memory and latency guard)
    # SpecAugment at training: per clip, `*_stripes` stripes of width uniform in [0, *_drop_width).
    # Reference values: 2 x 13 of 204 frames (~13 %), 2 x 8 of 128 mel bins (~12.5 %).
    time_drop_width: int = 13
    time_stripes: int = 2
    freq_drop_width: int = 8
    freq_stripes: int = 2
    spec_augment: str = "mixture"  # stripes blended 50/50 with another clip | "replace": copied from it
    channel: str = "first"  # "first" (the reference's, via kaldi.fbank) | "mean" of the channels
    global_clip: bool = True  # + one clip of the whole audio (the reference's use_global)

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.num_clips <= 0 or self.num_mel_bins <= 0:
            raise ValueError("sample_rate, num_clips and num_mel_bins must be positive")
        if self.channel not in ("first", "mean"):
            raise ValueError(f"channel must be 'first' or 'mean', got {self.channel!r}")
        if self.spec_augment not in ("mixture", "replace"):
            raise ValueError(f"spec_augment must be 'mixture' or 'replace', got {self.spec_augment!r}")
        if self.clip_seconds * 1000.0 < self.frame_length_ms:
            raise ValueError(
                f"clip_seconds={self.clip_seconds} is shorter than one fbank frame "
                f"({self.frame_length_ms} ms)"
            )
        if self.target_length <= 0 or self.std <= 0:
            raise ValueError("target_length and std must be positive")

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def total_clips(self) -> int:
        """Clips per input as the encoder sees them: `num_clips` (+ 1 with `global_clip`)."""
        return self.num_clips + int(self.global_clip)

    @classmethod
    def for_model(cls, model: "BuboGPTConfig", **overrides) -> "AudioPreprocessConfig":
        """The fbank layout and choices of a model config (its audio encoder's mels and frames)."""
        fields = dict(
            num_clips=model.audio_clips,
            num_mel_bins=model.audio.num_mel_bins,
            target_length=model.audio.target_length,
            channel=model.audio_channel,
            global_clip=model.audio_global_clip,
            spec_augment=model.spec_augment,
        )
        return cls(**{**fields, **overrides})


@dataclass
class ImagePreprocessConfig:
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    train_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop area fraction at training
    eval_resize: str = "center_crop"  # the reference's eval processor | "squash": the whole image

    def __post_init__(self) -> None:
        if self.eval_resize not in ("center_crop", "squash"):
            raise ValueError(f"eval_resize must be 'center_crop' or 'squash', got {self.eval_resize!r}")

    @classmethod
    def for_model(cls, model: "BuboGPTConfig", **overrides) -> "ImagePreprocessConfig":
        fields = dict(image_size=model.vision.img_size, eval_resize=model.image_eval_resize)
        return cls(**{**fields, **overrides})


# --------------------------------------------------------------------------------------------------
# Reading bytes
# --------------------------------------------------------------------------------------------------


def _read_source(src: MediaSource, error: type[MediaError]) -> tuple[bytes, str]:
    """Returns (the encoded bytes, a name for messages)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), f"<{len(src)} bytes>"
    elif isinstance(src, (str, Path)):
        path = Path(src)
        name = str(path)
        if not path.is_file():
            raise error(f"{name}: file not found")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise error(f"{name}: cannot read file: {err}") from err
    else:
        raise TypeError(f"expected bytes or a path, got {type(src).__name__}")
    if not data:
        raise error(f"{name}: empty input (0 bytes)")
    return data, name


# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------

# libsndfile reports a WAV whose data chunk is cut short as "data : <declared> (should be <actual>)"
# and then silently decodes what is there; we want truncation to be an error.
_WAV_DATA_SHORT = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_WAV_SIZES = {0, 0xFFFFFFFF}  # written by streaming encoders that never patch the header


def decode_audio(src: MediaSource, max_seconds: float = 600.0) -> tuple[torch.Tensor, int]:
    """Decodes WAV / FLAC / OGG / MP3 (anything libsndfile reads) with soundfile.

    Returns (waveform (channels, samples) float32 in [-1, 1], sample_rate). Raises AudioDecodeError
    for empty, unrecognised, corrupt, truncated, zero-length, non-finite or over-long audio.
    """
    data, name = _read_source(src, AudioDecodeError)
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.SoundFileError, RuntimeError) as err:
        raise AudioDecodeError(
            f"{name}: not a readable audio file (WAV/FLAC/OGG/MP3): {err}"
        ) from err
    if info.samplerate <= 0:
        raise AudioDecodeError(f"{name}: invalid sample rate {info.samplerate}")
    if info.frames <= 0:
        raise AudioDecodeError(f"{name}: audio has no samples (zero length)")
    duration = info.frames / info.samplerate
    if duration > max_seconds:
        raise AudioDecodeError(f"{name}: audio is {duration:.1f} s long, more than {max_seconds} s")
    short = _WAV_DATA_SHORT.search(info.extra_info or "")
    if short and int(short.group(1)) not in _STREAMING_WAV_SIZES:
        raise AudioDecodeError(
            f"{name}: truncated audio: header declares {short.group(1)} data bytes, "
            f"file holds {short.group(2)}"
        )
    try:
        samples, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as err:
        raise AudioDecodeError(f"{name}: corrupt or truncated audio: {err}") from err
    if samples.shape[0] == 0:
        raise AudioDecodeError(f"{name}: audio has no samples (zero length)")
    # MP3 frame counts are estimates, hence the 1 % slack.
    if samples.shape[0] < 0.99 * info.frames:
        raise AudioDecodeError(
            f"{name}: truncated audio: header declares {info.frames} frames, "
            f"decoded {samples.shape[0]}"
        )
    if not np.isfinite(samples).all():
        raise AudioDecodeError(f"{name}: audio contains NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(samples.T)), int(sample_rate)  # (C, N)


def _tile_to_length(waveform: torch.Tensor, length: int) -> torch.Tensor:
    """(N,) -> (max(N, length),): audio shorter than a clip is repeated until it fills one."""
    if waveform.numel() >= length:
        return waveform
    repeats = math.ceil(length / waveform.numel())
    return waveform.repeat(repeats)[:length]


def _clip_starts(
    num_samples: int,
    clip_samples: int,
    num_clips: int,
    train: bool,
    generator: torch.Generator | None,
) -> list[int]:
    """Start sample of each clip: uniformly random at training, evenly spaced otherwise.

    Evenly spaced as pytorchvideo's ConstantClipsPerVideoSampler: start_i = i * (N - L) / (n - 1).
    """
    max_start = num_samples - clip_samples
    if train:
        starts = torch.randint(0, max_start + 1, (num_clips,), generator=generator)
        return sorted(starts.tolist())
    step = max_start / max(num_clips - 1, 1)
    return [round(i * step) for i in range(num_clips)]


def _clip_fbank(clip: torch.Tensor, config: AudioPreprocessConfig) -> torch.Tensor:
    """(clip_samples,) 16 kHz mono -> normalised fbank (1, num_mel_bins, target_length)."""
    clip = clip - clip.mean()  # a new tensor: the caller's waveform stays untouched
    fbank = kaldi.fbank(
        clip.unsqueeze(0),
        htk_compat=True,
        sample_frequency=config.sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=config.num_mel_bins,
        dither=0.0,
        frame_length=config.frame_length_ms,
        frame_shift=config.frame_shift_ms,
    )  # (frames, mel); log of energies floored at float eps, so silence stays finite
    fbank = fbank.transpose(0, 1).unsqueeze(0)  # (1, mel, frames)
    if fbank.shape[-1] != config.target_length:
        # torchvision's Resize on a tensor as the reference called it: bilinear, no antialias.
        fbank = F.interpolate(
            fbank.unsqueeze(0),
            size=(config.num_mel_bins, config.target_length),
            mode="bilinear",
            align_corners=False,
        ).squeeze(0)  # (1, mel, target_length)
    return (fbank - config.mean) / config.std


def audio_to_fbank_clips(
    waveform: torch.Tensor,
    sample_rate: int,
    config: AudioPreprocessConfig | None = None,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(channels, samples) or (samples,) waveform -> (total_clips, 1, num_mel_bins, target_length).

    `train` picks random clips and applies `spec_augment`; `generator` makes that reproducible.
    The input tensor is not modified.
    """
    config = config or AudioPreprocessConfig()
    if not isinstance(waveform, torch.Tensor) or waveform.ndim not in (1, 2):
        raise MediaError("waveform must be a tensor of shape (channels, samples) or (samples,)")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise MediaError(f"sample rate must be a positive integer, got {sample_rate}")
    if waveform.shape[-1] == 0 or waveform.numel() == 0:
        raise MediaError("waveform has no samples (zero length)")
    if waveform.shape[-1] / sample_rate > config.max_seconds:
        seconds = waveform.shape[-1] / sample_rate
        raise MediaError(f"audio is {seconds:.1f} s long, more than {config.max_seconds} s")
    if not torch.isfinite(waveform).all():
        raise MediaError("waveform contains NaN or infinite samples")

    mono = waveform.float()
    if mono.ndim == 2:
        # kaldi.fbank's `channel=-1` reads channel 0 (torchaudio/compliance/kaldi.py:135-137), which
        # is what the reference's waveform2melspec (imagebind/data/data_utils.py:34) got.
        mono = mono[0] if config.channel == "first" else mono.mean(dim=0)  # (N,)
    if sample_rate != config.sample_rate:
        mono = torchaudio.functional.resample(mono, int(sample_rate), config.sample_rate)
    mono = _tile_to_length(mono, config.clip_samples)

    starts = _clip_starts(mono.numel(), config.clip_samples, config.num_clips, train, generator)
    clips = [_clip_fbank(mono[s : s + config.clip_samples], config) for s in starts]
    if config.global_clip:
        # The reference appends the whole waveform as the last clip (imagebind_audio_processor.py:105-106).
        clips.append(_clip_fbank(mono, config))
    fbank_clips = torch.stack(clips)  # (total_clips, 1, mel, target_length)
    if train:
        fbank_clips = spec_augment(
            fbank_clips,
            generator,
            time_drop_width=config.time_drop_width,
            time_stripes=config.time_stripes,
            freq_drop_width=config.freq_drop_width,
            freq_stripes=config.freq_stripes,
            mode=config.spec_augment,
        )
    return fbank_clips


def _stripes(
    size: int, drop_width: int, count: int, generator: torch.Generator | None
) -> list[tuple[int, int]]:
    """`count` (start, end) stripes along an axis of `size`, widths uniform in [0, drop_width)."""
    stripes = []
    for _ in range(count):
        width = int(torch.randint(0, max(min(drop_width, size + 1), 1), (1,), generator=generator))
        start = int(torch.randint(0, size - width + 1, (1,), generator=generator))
        stripes.append((start, start + width))
    return stripes


def spec_augment(
    fbank_clips: torch.Tensor,
    generator: torch.Generator | None = None,
    time_drop_width: int = 13,
    time_stripes: int = 2,
    freq_drop_width: int = 8,
    freq_stripes: int = 2,
    mode: str = "mixture",
) -> torch.Tensor:
    """SpecAugment stripes mixed between the clips of one sample.

    fbank_clips: (num_clips, 1, mel, frames). For every clip, `time_stripes` frame stripes and
    `freq_stripes` mel-bin stripes (widths uniform in [0, drop_width)) take the same region of
    another clip of the same sample, so the masked region still looks like this sound rather than
    a hole.

    "mixture" (the reference's SpecAugment++ `MixStripes`, audio_augment.py:76-100, its
    `mask_type='mixture'` default at imagebind_audio_processor.py:92): all time stripes first, then
    all frequency stripes; for each pass the clips are shuffled (`randperm`, a clip may draw itself)
    and each stripe becomes 0.5 * itself + 0.5 * the shuffled clip's region.
    "replace": each stripe is copied from a random other clip; with a single clip it is set to 0,
    the normalised fbank mean. Returns a new tensor; the input is unchanged.
    """
    if fbank_clips.ndim != 4:
        shape = tuple(fbank_clips.shape)
        raise ValueError(f"expected (num_clips, 1, mel, frames), got shape {shape}")
    if mode not in ("mixture", "replace"):
        raise ValueError(f"mode must be 'mixture' or 'replace', got {mode!r}")
    num_clips, _, num_mel, num_frames = fbank_clips.shape
    augmented = fbank_clips.clone()
    if mode == "mixture":
        for dim, size, drop_width, count in (
            (2, num_frames, time_drop_width, time_stripes),
            (1, num_mel, freq_drop_width, freq_stripes),
        ):
            donors = augmented[torch.randperm(num_clips, generator=generator)]  # a copy, before this pass
            for clip in range(num_clips):
                for start, end in _stripes(size, drop_width, count, generator):
                    stripe = augmented[clip].narrow(dim, start, end - start)
                    stripe.copy_(0.5 * stripe + 0.5 * donors[clip].narrow(dim, start, end - start))
        return augmented
    for clip in range(num_clips):
        # dims of one clip (1, mel, frames): 2 = time, 1 = frequency
        for dim, size, drop_width, count in (
            (2, num_frames, time_drop_width, time_stripes),
            (1, num_mel, freq_drop_width, freq_stripes),
        ):
            for start, end in _stripes(size, drop_width, count, generator):
                stripe = augmented[clip].narrow(dim, start, end - start)  # a view into `augmented`
                if num_clips == 1:
                    stripe.zero_()
                    continue
                # a random clip other than this one: draw among the others, skip over `clip`
                donor = int(torch.randint(0, num_clips - 1, (1,), generator=generator))
                donor += donor >= clip
                stripe.copy_(fbank_clips[donor].narrow(dim, start, end - start))
    return augmented


def load_audio_fbank(
    src: MediaSource,
    config: AudioPreprocessConfig | None = None,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Encoded audio -> (total_clips, 1, num_mel_bins, target_length)."""
    config = config or AudioPreprocessConfig()
    waveform, sample_rate = decode_audio(src, max_seconds=config.max_seconds)
    return audio_to_fbank_clips(waveform, sample_rate, config, train=train, generator=generator)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited on white (not PIL's black)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit greyscale: PIL's convert("RGB") would clip it; scale the 0..65535 range to 8 bits.
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(src: MediaSource, max_pixels: int = 40_000_000) -> Image.Image:
    """Decodes any PIL-readable image to RGB, EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded (decompression-bomb
    guard), and the pixels are decoded here so a truncated file fails here. Raises ImageDecodeError.
    """
    data, name = _read_source(src, ImageDecodeError)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"{name}: image is {width}x{height} = {width * height} pixels, more than the "
                f"{max_pixels} allowed (decompression-bomb guard)"
            )
        image.load()
        image = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{name}: image refused as a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError(f"{name}: not a recognised image format") from err
    except Exception as err:  # PIL's format plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(f"{name}: corrupt or truncated image: {err}") from err
    if image.width == 0 or image.height == 0:
        raise ImageDecodeError(f"{name}: image has zero size")
    return _to_rgb(image)


def image_transform(
    config: ImagePreprocessConfig | None = None, train: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> (3, image_size, image_size) float32, normalised.

    Training: RandomResizedCrop (area `train_scale`, bicubic). Inference with
    `eval_resize="center_crop"`: bicubic resize of the short side to image_size, then a centre crop,
    as the reference's `imagebind_vision_eval` processor (imagebind_vision_processor.py:124-133,
    named by eval_configs/mmgpt4_eval.yaml:33); `"squash"`: bicubic resize of the whole image to
    image_size x image_size, which keeps what lies near the long side's ends of a non-square image.
    """
    config = config or ImagePreprocessConfig()
    size = config.image_size
    if train:
        # Imported here: torchvision's import costs 1-1.5 s of CPU (it pulls in torch._dynamo), which
        # every data-preparation actor and Serve replica would pay for the eval path below.
        from torchvision import transforms

        bicubic = transforms.InterpolationMode.BICUBIC
        crop = transforms.RandomResizedCrop(size, scale=config.train_scale, interpolation=bicubic)
        return transforms.Compose([crop, transforms.ToTensor(), transforms.Normalize(config.mean, config.std)])
    mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
    center_crop = config.eval_resize == "center_crop"

    def eval_transform(image: Image.Image) -> torch.Tensor:
        # What torchvision's Resize(size) + CenterCrop(size), or Resize((size, size)), with BICUBIC,
        # then ToTensor + Normalize do to an RGB PIL image, op for op (tests/test_prepare.py checks
        # that they are bit-identical).
        if center_crop:
            width, height = image.size
            short, long = min(width, height), max(width, height)
            long = int(size * long / short)  # torchvision's rounding of the long side
            image = image.resize((size, long) if width <= height else (long, size), Image.Resampling.BICUBIC)
            top, left = int(round((image.height - size) / 2.0)), int(round((image.width - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return pixels.to(torch.float32).div(255).sub_(mean).div_(std)

    return eval_transform


def load_image(
    src: MediaSource,
    config: ImagePreprocessConfig | None = None,
    train: bool = False,
    max_pixels: int = 40_000_000,
) -> torch.Tensor:
    """Encoded image -> (3, image_size, image_size)."""
    return image_transform(config, train)(decode_image(src, max_pixels=max_pixels))
