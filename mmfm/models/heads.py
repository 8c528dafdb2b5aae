"""Task heads on top of the trunk: MLM (tied decoder), ITM, answer classifiers (ViLT VQA head)."""

import torch
import torch.nn.functional as F
from torch import nn


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder tied to the token embedding."""

    def __init__(self, width: int, embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(hidden, self.embedding.weight, self.bias)


class AnswerHead(nn.Sequential):
    """ViLT's VQA classifier: width -> 2*width -> LayerNorm -> GELU -> answers."""

    def __init__(self, width: int, num_answers: int):
        super().__init__(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                         nn.Linear(2 * width, num_answers))
