"""`full` mode is plain attention: its greedy output equals transformers' own generate."""
import torch
from transformers import AutoModelForCausalLM

from engine.attention import AttentionConfig
from engine.loader import resolve
from engine.sampling import SamplingParams
from engine.sequence import Request


def test_full_mode_equals_transformers_generate(engine):
    d, gguf = resolve("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf, dtype=torch.float32)  # from the GGUF itself
    msgs = [{"role": "user", "content": "Write a short poem about the sea and the wind."}]
    ids = engine.encode_chat(msgs)
    want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, attention_mask=torch.ones(1, len(ids),
                       dtype=torch.long), pad_token_id=engine.tokenizer.eos_token_id)[0, len(ids):].tolist()
    outs = engine.generate(Request(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                                   AttentionConfig(mode="full")))
    got = [o.token for o in outs if o.token is not None]
    assert got[: len(want)] == want
