"""Generation (MLFM.md, Sampler): the promotion sampler, guidance, the flow and MDM baselines, a distilled flow
map's few-jump sampler, ``mlfm sample``, and samples drawn during training."""
from mlfm_scale.sample.denoiser import Denoiser, ModelDenoiser
from mlfm_scale.sample.sampler import generate
from mlfm_scale.sample.state import SampleOutput

__all__ = ["Denoiser", "ModelDenoiser", "SampleOutput", "generate"]
