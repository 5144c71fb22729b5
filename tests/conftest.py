"""Fixtures several test files share: one torch thread, a tiny random model, and a tiny random chat model saved as a
model directory."""

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and idle-spinning threads crawl when other jobs share the cores.
    Use it in a module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """make(name, text=..., layers=1, max_positions=4096) -> the path of a saved random 32-wide chat model whose
    tokenizer is trained on ``text`` (300 tokens)."""

    def make(name: str, text: str = "The assistant answers the user. Response A or B? I can help with that.\n",
             layers: int = 1, max_positions: int = 4096):
        tok = train_tokenizer([text] * 20, vocab_size=300)
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=max_positions))
        path = tmp_path_factory.mktemp(name) / "model"
        save_model_dir(path, model, tok)
        return path
    return make


@pytest.fixture(scope="module")
def model():
    """A random 2-layer model (vocab 64, GQA 4/2 heads) in eval mode, for the generation engine's tests."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
