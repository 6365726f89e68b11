"""A variational autoencoder on handwritten digits, with a custom loop built from functrain pieces.

Run: ``python examples/vae/train.py`` (about 10 seconds on 2 idle CPU cores; smoke run: ``--steps 3``).

What it shows:

- ``loss_fn`` returns ``(loss, metrics)``: the step differentiates the loss (the negative ELBO) and
  hands back the reconstruction and KL terms as metrics, on the device, with no extra pass.
- Randomness as an input: the reparameterisation noise ``eps`` is drawn in the loop from an explicit
  ``torch.Generator`` and passed in with the batch. The step stays a pure function of
  ``(state, batch)``: rerunning it gives the same result, and compiling it captures no RNG state.
- A KL warm-up weight ``beta`` travels in the batch as a 0-d tensor, so it changes every step
  without recompiling a compiled step.
- A loop of its own: ``ft.Loop`` supplies the step and epoch counting, running means of the
  metrics, held-out evaluation and the callbacks (progress bar, JSONL log, and a callback of our
  own that writes decoded samples as PNG files).

Writes to ``--out`` (default ``runs/vae``): ``samples/epoch-NNN.png`` (the same 64 latent points
decoded after each epoch), ``samples.png`` and ``reconstructions.png`` (held-out digits over their
reconstructions) at the end, and ``log.jsonl``.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

import functrain as ft

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="runs/vae")
parser.add_argument("--epochs", type=int, default=40)
parser.add_argument("--steps", type=int, help="train this many steps instead of --epochs (smoke runs)")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--latent", type=int, default=16)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--kl-warmup", type=int, default=200, help="steps over which beta rises from 0 to 1")
parser.add_argument("--compile", action="store_true")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
out = Path(args.out)
(out / "samples").mkdir(parents=True, exist_ok=True)
SIZE = 28

# ----------------------------------------------------------------------------- data: the digits at 28x28
train_loader = ft.data.make_loader(ft.data.digits("train", size=SIZE), args.batch_size, seed=args.seed)
test_images = torch.stack([image for image, _ in ft.data.digits("test", size=SIZE)]).float().div(255).flatten(1)


# ----------------------------------------------------------------------------- the model and its loss
class VAE(nn.Module):
    def __init__(self, pixels: int, latent: int, hidden: int = 400):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, pixels))

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        z = mean + torch.exp(0.5 * log_var) * eps  # the reparameterisation: noise from outside
        return self.decoder(z), mean, log_var


def loss_fn(model, batch):
    """The negative ELBO per image: reconstruction (Bernoulli) + beta * KL(q(z|x) || N(0, I))."""
    x, eps, beta = batch
    logits, mean, log_var = model(x, eps)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
    kl = -0.5 * torch.sum(1 + log_var - mean**2 - log_var.exp()) / len(x)
    return recon + beta * kl, {"recon": recon, "kl": kl}


model = VAE(SIZE * SIZE, args.latent)
tx = ft.chain(ft.clip_by_global_norm(10.0), ft.adam(lr=args.lr))
state = ft.TrainState.create(model, tx)
step = ft.make_train_step(model, loss_fn, tx, compile=args.compile)
evaluate_batch = ft.make_eval_step(model, loss_fn)

rng = torch.Generator().manual_seed(args.seed)  # the only source of randomness in training
test_eps = torch.randn(len(test_images), args.latent, generator=torch.Generator().manual_seed(1))
ONE = torch.tensor(1.0)


def evaluate(state):
    """Held-out negative ELBO (beta = 1) with fixed noise, so epochs compare like for like."""
    return evaluate_batch(state, (test_images, test_eps, ONE))


def decode(state, z):
    """The decoder with the state's weights. The model object itself still holds its initial weights
    (a pure step never writes to it), so it runs through ``functional_call``."""
    weights = {k.removeprefix("decoder."): v for k, v in state.params.items() if k.startswith("decoder.")}
    return torch.sigmoid(torch.func.functional_call(model.decoder, weights, (z,)))


class SaveSamples(ft.Callback):
    """Decodes the same 64 latent points after every epoch, and writes the final pictures."""

    def __init__(self):
        self.z = torch.randn(64, args.latent, generator=torch.Generator().manual_seed(2))

    def on_epoch_end(self, loop):
        save_image(decode(loop.state, self.z).view(-1, 1, SIZE, SIZE), out / "samples" / f"epoch-{loop.epoch:03d}.png")

    def on_fit_end(self, loop):
        save_image(decode(loop.state, self.z).view(-1, 1, SIZE, SIZE), out / "samples.png")
        with torch.no_grad():
            logits, _, _ = torch.func.functional_call(model, loop.state.params, (test_images[:32], test_eps[:32]))
        pairs = torch.cat([test_images[:32], torch.sigmoid(logits)]).view(-1, 1, SIZE, SIZE)
        save_image(pairs, out / "reconstructions.png", nrow=16)  # two rows of originals, two of reconstructions


class PrintEval(ft.Callback):
    def on_eval_end(self, loop):
        e = loop.eval_logs
        if loop.epoch % 5 == 4 or loop.finished:
            print(f"epoch {loop.epoch:3d}  held-out -ELBO {e['loss']:.2f} = recon {e['recon']:.2f} + KL {e['kl']:.2f}")


# ----------------------------------------------------------------------------- the loop
total_steps = args.steps or args.epochs * len(train_loader)
callbacks = [ft.callbacks.ProgressBar(), ft.callbacks.JSONLogger(out / "log.jsonl"), SaveSamples(), PrintEval()]
loop = ft.Loop(callbacks, log_every=20, loader=train_loader, evaluate=evaluate, max_steps=total_steps)
start = time.perf_counter()
state = loop.fit_start(state)
while not loop.finished:
    state = loop.epoch_start(state)
    for images, _ in train_loader:
        eps = torch.randn(len(images), args.latent, generator=rng)
        beta = torch.tensor(min(1.0, loop.step / args.kl_warmup))  # a tensor: a new value never recompiles
        state, metrics = step(state, (images.flatten(1), eps, beta))
        state = loop.step_end(state, {**metrics, "beta": beta})
        if loop.finished:
            break
    if loop.finished and loop.batch < len(train_loader):
        break  # stopped mid-epoch (--steps)
    state = loop.epoch_end(state)
state = loop.fit_end(state)
elapsed = time.perf_counter() - start

final = {k: float(v) for k, v in evaluate(state).items()}
print(
    f"Held-out negative ELBO {final['loss']:.2f} nats per image (recon {final['recon']:.2f}, KL {final['kl']:.2f}) "
    f"after {loop.step} steps in {elapsed:.0f}s; wrote {out / 'samples.png'} and {out / 'reconstructions.png'}"
)
