"""Writes tests/data/eas_v1: adapters saved by skipvlm's format-1 code (commit 39bb2dc)."""
import sys, torch
sys.path.insert(0, "tests")
from conftest import build_model
import skipvlm
torch.manual_seed(0)
model = build_model("llama")
cfg = skipvlm.EASConfig(supernet=True, candidates="attention", skip_attention=[1, 3], init_seed=3)
eas = skipvlm.get_eas_model(model, cfg)
with torch.no_grad():
    for p in eas.adapters.parameters():
        p.add_(0.05 * torch.randn_like(p))
eas.eval()
ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
eas.calibrate([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
logits = eas(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
eas.save_pretrained("tests/data/eas_v1")
from safetensors.torch import save_file
save_file({"logits": logits.detach().contiguous()}, "tests/data/eas_v1/expected_logits.safetensors")
print(sorted(eas.adapter_state_dict())[:6], len(eas.adapter_state_dict()))
