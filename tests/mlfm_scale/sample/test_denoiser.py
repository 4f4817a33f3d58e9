"""The training network (megatron MLFMModel, TP = 1) behind the sampler's denoiser interface."""
import torch

from mlfm_scale.config import ModelSection, SampleSection
from mlfm_scale.flow.schedules import UniformGamma
from mlfm_scale.model.mlfm import MLFMModel
from mlfm_scale.sample import ModelDenoiser, generate

CFG = ModelSection(num_layers=1, hidden_size=32, num_heads=4, ffn_hidden_size=64, time_embed_dim=16,
                   time_hidden_size=24)
VOCAB = 50  # padded to 128 inside the model


def test_model_denoiser_cuts_the_padded_vocabulary_and_samples(process_group):
    torch.manual_seed(0)
    model = MLFMModel(CFG, VOCAB).eval()
    denoiser = ModelDenoiser(model, VOCAB, mask_id=49, eos_id=47, pad_id=48, sigma=0.2, seq_len=16,
                             schedule=UniformGamma(-10.0, 6.0))
    z = denoiser.embed(torch.tensor([[1, 2, 49]]))
    assert denoiser(z, torch.tensor([0.0])).shape == (1, 3, VOCAB) and denoiser.embedding_table().shape == (VOCAB, 32)
    torch.testing.assert_close(denoiser.mask_embedding(), z[0, 2])
    assert not denoiser.flow_map
    out = generate(denoiser, [[1, 2], [3]], SampleSection(steps=2, length=5, temperature=1.0, stop_at_eos=False))
    assert out.ids[0, :2].tolist() == [1, 2] and out.ids[1, 0] == 3
    assert all(len(g) == 5 and all(0 <= t < 48 for t in g) for g in out.generated)  # never the mask or pad id


def test_model_denoiser_passes_a_flow_map_students_jump_target(process_group):
    torch.manual_seed(0)
    model = MLFMModel(CFG.model_copy(update={"flow_map": True}), VOCAB).eval()
    for weight in (model.decoder.layers[0].modulation.weight, model.target_gamma_embedding.mlp[2].weight):
        torch.nn.init.normal_(weight, std=0.5)  # trained: the jump target reaches the logits
    denoiser = ModelDenoiser(model, VOCAB, mask_id=49, eos_id=47, pad_id=48, sigma=0.2, seq_len=16,
                             schedule=UniformGamma(-10.0, 6.0))
    z, gamma, target = denoiser.embed(torch.tensor([[1, 2, 49]])), torch.tensor([0.0]), torch.tensor([-4.0])
    jump = denoiser(z, gamma, gamma_target=target)
    assert denoiser.flow_map and not torch.allclose(jump, denoiser(z, gamma))
    torch.testing.assert_close(jump, model(z, gamma, None, target)[..., :VOCAB], rtol=0, atol=0)
    out = generate(denoiser, [[1, 2]], SampleSection(method="flowmap", steps=2, length=5, promotion=False,
                                                     temperature=1.0, stop_at_eos=False))
    assert out.nfe.tolist() == [2] and out.rounds.tolist() == [1] and len(out.generated[0]) == 5
