"""Built-in architectures for `sparsert model`, randomly initialised (nothing is downloaded).

ResNet-50 is torchvision's when torchvision is importable, else the same network written here
(Bottleneck v1.5: stride on the 3x3). MobileNet v1 (1.0, 224) and a BERT-base encoder (12 layers,
hidden 768, 12 heads, FFN 3072, GELU, post-LayerNorm; input: hidden states) are written here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MODELS = ("resnet50", "mobilenet_v1", "bert_base")


# ---- ResNet-50 ---------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, stages = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(inplanes, planes, stride, down)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50() -> nn.Module:
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except ImportError:
        return ResNet50()
    return tv_resnet50(weights=None)


# ---- MobileNet v1 ------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNet v1 1.0: a 3x3 stem, 13 depthwise-separable blocks (depthwise 3x3 + BN + ReLU,
    pointwise 1x1 + BN + ReLU), average pool, classifier."""

    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
              (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        c = int(32 * width)
        layers = [_conv_bn(3, c, 3, 2)]
        for out, stride in self.BLOCKS:
            out = int(out * width)
            layers += [_conv_bn(c, c, 3, stride, groups=c), _conv_bn(c, out, 1, 1)]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ---- BERT-base encoder -------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    def __init__(self, hidden: int = 768, heads: int = 12, ffn: int = 3072, eps: float = 1e-12):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.ffn_up = nn.Linear(hidden, ffn)
        self.ffn_down = nn.Linear(ffn, hidden)
        self.act = nn.GELU()        # a module, as HF's BERT (GELUActivation): sparsify_ fuses it
        self.norm2 = nn.LayerNorm(hidden, eps=eps)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = t.shape
        return t.view(batch, tokens, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(self, x):
        batch, tokens, hidden = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        ctx = F.scaled_dot_product_attention(q, k, v)
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, hidden)
        x = self.norm1(x + self.attn_out(ctx))
        return self.norm2(x + self.ffn_down(self.act(self.ffn_up(x))))


class BertEncoder(nn.Module):
    def __init__(self, layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        for module in self.modules():          # BERT's initialisation: N(0, 0.02)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ---- entry -------------------------------------------------------------------------------------
def build(name: str, *, batch: int = 1, resolution: int = 224, tokens: int = 128,
          seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """(model in eval mode with random weights and BatchNorm statistics, example input)."""
    from .errors import UserError

    if name not in MODELS:
        raise UserError(f"unknown model {name!r} (built in: {', '.join(MODELS)}, or FILE.onnx)")
    torch.manual_seed(seed)
    if name == "resnet50":
        model, x = resnet50(), torch.randn(batch, 3, resolution, resolution)
    elif name == "mobilenet_v1":
        model, x = MobileNetV1(), torch.randn(batch, 3, resolution, resolution)
    else:
        model, x = BertEncoder(), torch.randn(batch, tokens, 768)
    with torch.no_grad():         # non-trivial BN statistics, so folding is exercised
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval(), x
