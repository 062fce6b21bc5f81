"""Check that SAELens reads what ``save_sae`` and ``train_sae`` write, with the same maths.

Makes its own virtual environment with sae-lens (``--venv``, default ``.saelens-venv``;
created with ``pip install sae-lens==6.54.*`` when missing), writes one SAE of each kind
SAELens has (and one trained by ``iv.train_sae``) into a temporary directory with inputs and
this package's ``encode`` / ``forward`` outputs as safetensors files, then runs SAELens's
``SAE.load_from_disk`` on each in that environment and compares at fp32, atol = rtol = 1e-5.
Not run in CI (sae-lens is large)::

    python scripts/saelens_interop.py [--venv DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import interventions as iv
import interventions.reference_models.superposition as sp

CHECK = r"""
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from sae_lens import SAE
root = Path(sys.argv[1])
failed = 0
for d in sorted(p for p in root.iterdir() if p.is_dir()):
    data = load_file(str(root / f"{d.name}.io.safetensors"))
    sae = SAE.load_from_disk(str(d), device="cpu")
    with torch.no_grad():
        f = sae.encode(data["x"])
        out = sae.decode(f)
        if hasattr(sae, "W_skip"):
            out = out + data["x"] @ sae.W_skip.T
    ok = torch.allclose(f, data["f"], atol=1e-5, rtol=1e-5) and torch.allclose(
        out, data["out"], atol=1e-5, rtol=1e-5)
    err = max(float((f - data["f"]).abs().max()), float((out - data["out"]).abs().max()))
    print(f"{d.name:22s} {type(sae).__name__:22s} max|diff| {err:.2e} {'ok' if ok else 'FAIL'}")
    failed += not ok
sys.exit(1 if failed else 0)
"""


def examples() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g) * 0.5

    d, s, o = 6, 16, 4
    enc, dec = {"W_enc": r(d, s), "b_enc": r(s) * 0.1}, {"W_dec": r(s, d), "b_dec": r(d) * 0.1}
    tdec = {"W_dec": r(s, o), "b_dec": r(o) * 0.1}
    out: dict[str, object] = {
        "relu": iv.StandardSAE(**enc, **dec, apply_b_dec_to_input=True),
        "relu-rescaled": iv.StandardSAE(**enc, **dec, constant_norm_rescale=True),
        "jumprelu": iv.JumpReLUSAE(**enc, **dec, threshold=r(s).abs() * 0.2),
        "topk": iv.TopKSAE(**enc, **dec, k=4, apply_b_dec_to_input=True),
        "batchtopk": iv.BatchTopKSAE(**enc, **dec, threshold=torch.full((s,), 0.1), k=4.0),
        "gated": iv.GatedSAE(**enc, **dec, r_mag=r(s) * 0.1, b_mag=r(s) * 0.1),
        "transcoder": iv.Transcoder(**enc, **tdec),
        "jumprelu_transcoder": iv.JumpReLUTranscoder(**enc, **tdec, threshold=r(s).abs() * 0.1),
        "skip_transcoder": iv.SkipTranscoder(**enc, **tdec, W_skip=r(o, d)),
    }
    model = sp.load_superposition_model()
    gen = torch.Generator().manual_seed(1)
    batches = [sp.feature_batch(4096, gen) for _ in range(4)]
    for kind in ("relu", "topk", "jumprelu"):
        out[f"trained-{kind}"] = iv.train_sae(
            model, sp.HIDDEN_SITE, batches, kind=kind, d_sae=20, k=3, steps=16, progress=False
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=".saelens-venv")
    venv = Path(parser.parse_args().venv)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "sae-lens==6.54.*"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, sae in examples().items():
            iv.save_sae(sae, root / name)  # type: ignore[arg-type]
            x = torch.randn(32, sae.d_in, generator=torch.Generator().manual_seed(2))  # type: ignore[attr-defined]
            f = sae.encode(x)  # type: ignore[attr-defined]
            save_file(
                {"x": x, "f": f, "out": sae.forward(x)},  # type: ignore[attr-defined]
                str(root / f"{name}.io.safetensors"),
            )
        (root / "check.py").write_text(CHECK)
        done = subprocess.run([str(python), str(root / "check.py"), str(root)])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
