"""deepSTRF's dense-tensor helpers of video datasets (the reference's names and results)."""

import pytest
import torch
from toydata import ToyVideo

from deepstrf.datasets.video import dense


@pytest.fixture
def v():
    return ToyVideo(1)


def test_tensor_forms_of_the_transforms_leave_the_dataset_alone(v):
    resp = torch.poisson(torch.rand(4, 3, 5, 12, generator=torch.Generator().manual_seed(0)) * 3)
    before = v.responses[0][0].clone()
    z = v.normalize_responses(resp)
    assert z.shape == resp.shape and torch.allclose(z.mean(-1), torch.zeros(4, 3, 5), atol=1e-6)
    delta = torch.zeros(1, 1, 1, 21)
    delta[..., 10] = 1
    smooth = v.smooth_responses(delta, sigma_time_step=2, kernel_size=11, padding=5)
    assert smooth.shape == delta.shape and torch.isclose(smooth.sum(), torch.tensor(1.0))
    assert torch.allclose(smooth[..., :10], smooth[..., 11:].flip(-1))  # a symmetric kernel
    assert torch.equal(v.responses[0][0], before)
    v.normalize_responses("max")  # the dataset's own method still
    assert float(v.responses[0][0].max()) == 1.0


def test_frames_resized_subsampled_and_gray(v):
    video = torch.rand(3, 3, 6, 5, 8)
    assert torch.equal(v.change_spatial_resolution(video, (6, 5)), video)
    small = v.change_spatial_resolution(video, (3, 4))
    assert small.shape == (3, 3, 3, 4, 8) and (v.H, v.W) == (3, 4)
    assert v.change_spatial_resolution(torch.rand(2, 3, 3, 6, 5, 8), (2, 2)).shape == (2, 3, 3, 2, 2, 8)
    kept, frames = v.change_video_temporal_resolution(video, 10, 20)
    assert frames == 4 and torch.equal(kept, video[..., ::2])
    with pytest.raises(ValueError, match="whole multiple"):
        v.change_video_temporal_resolution(video, 10, 25)
    gray = v.from_rgb_to_grayscale(video)
    assert gray.shape == (3, 1, 6, 5, 8) and v.C == 1
    assert torch.allclose(gray[:, 0], 0.2989 * video[:, 0] + 0.587 * video[:, 1] + 0.114 * video[:, 2])


def test_rebinning_power_noise_and_clips(v):
    resp = torch.poisson(torch.rand(4, 3, 5, 12) * 3)
    video = torch.rand(3, 3, 6, 5, 12)
    coarse, frames, new_t = v.change_temporal_resolution(10, video, 10, resp, 20)
    assert new_t == 6 and coarse.sum() == resp.sum() and frames.shape[-1] == 6
    fine, _, new_t = v.change_temporal_resolution(10, video, 10, resp, 5)
    assert new_t == 24 and fine.sum() == 2 * resp.sum()
    same = torch.ones(1, 1, 4, 1) * torch.tensor([0.0, 2.0, 0.0, 2.0])  # every repeat alike: no noise
    assert torch.isclose(v.get_responses_signal_power(same)[0, 0], same[0, 0, 0].var())
    assert v.add_noise_to_videos(video, 0.0).equal(video)
    with pytest.raises(TypeError, match="dense layout"):
        v.split_into_clips(5)
    v.responses, v.videos = resp, video
    clips, clip_frames = v.split_into_clips(5)
    assert clips.shape == (4, 9, 5, 5) and clip_frames.shape == (9, 3, 6, 5, 5) and (v.S, v.T) == (9, 5)
    assert torch.equal(clips[:, :3, :, :5], resp[..., :5]) and clips[:, 6:, :, 2:].abs().sum() == 0  # padded
    assert torch.equal(dense.split_into_clips(resp, video, 12)[0], resp)
