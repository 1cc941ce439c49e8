"""Gumbel CL-LoRA: SD-LoRA whose adapters are gated by Gumbel-Sparsemax and pruned when unused.

SPEC section 3. Per task t >= 1 with ``two_phase``:
  phase 1 (ceil(phase1_fraction * epochs) epochs): gate logits + head train, alphas and the new
      adapter frozen; loss = CE + lambda_sparsity * entropy(beta); tau anneals every step;
  growth decision: prune adapters by the threshold or frequency rule (never the top one);
  phase 2 (the rest): logits frozen, beta deterministic at the tau phase 1 ended with; alphas
      (group lr ``alpha_lr``), the new adapter (if kept) and the head train with a fresh optimiser;
      loss = CE + lambda_alpha * sum(alpha^2).
Task 0, or ``two_phase: false``: one phase training everything, decision at the end.
After each task the mask and a beta log are written to the run folder; the mask file is read
back when the next task starts, so a pruned adapter never comes back.
"""
from __future__ import annotations

import math

import torch

from backbone.gate import GumbelGate
from models import register
from models.base import Learner, log
from utils.gumbel_utils import gumbel_sparsemax, sparsity_loss, temperature
from utils.io import load_tensors, save_torch


@register("gumbel_sdlora")
class GumbelSDLoRA(Learner):
    default_alpha = 1.0

    def make_gate(self, n_layers: int) -> GumbelGate:
        return GumbelGate(n_layers, self.cfg.gate_granularity, self.cfg.gate_scope)

    # ---- task start: mask from disk, schedule reset --------------------------------------------
    def begin_task(self, task: int, n_new_classes: int) -> None:
        super().begin_task(task, n_new_classes)
        self._load_mask_file()
        self.step = 0
        self.decision: dict = {}

    def _load_mask_file(self) -> None:
        """Intersect the in-memory mask with pruning_mask.pt: once pruned, pruned for good."""
        path = self.run_dir / "pruning_mask.pt"
        if not path.is_file():
            return
        self.gate.load_mask(torch.load(path, map_location="cpu", weights_only=True))
        self.net.backbone.configure()

    # ---- per-step pieces -------------------------------------------------------------------------
    def _anneal(self) -> None:
        c = self.cfg
        self.gate.tau = temperature(self.step, c.gumbel_tau_init, c.gumbel_tau_final, c.gumbel_anneal_rate)
        self.step += 1

    def _sparsity(self) -> torch.Tensor:
        beta = self.net.backbone.last_beta
        if beta is None:
            return torch.zeros((), device=self.device)
        return self.cfg.lambda_sparsity * sparsity_loss(beta, self.cfg.sparsity_eps)

    def _alpha_l2(self) -> torch.Tensor:
        alphas = [a for a in self.gate.alpha.values() if a.requires_grad]
        if not alphas:
            return torch.zeros((), device=self.device)
        return self.cfg.lambda_alpha * torch.stack(alphas).square().sum()

    # ---- what trains when --------------------------------------------------------------------------
    def set_trainable(self, logits: bool, alphas: bool, adapter: bool) -> None:
        """requires_grad per role; pruned adapters' alphas and logits never train. The head always does."""
        active = set(self.gate.active_tasks())
        for k, p in self.gate.logits.items():
            p.requires_grad_(logits and int(k) in active)
        for k, p in self.gate.alpha.items():
            p.requires_grad_(alphas and int(k) in active)
        cur = self.gate.current
        kept = cur is not None and cur in active
        for layer in self.net.backbone.layers:
            for d in (layer.lora_A, layer.lora_B):
                for k, p in d.items():
                    p.requires_grad_(adapter and kept and int(k) == cur)
        for p in self.net.head.parameters():
            p.requires_grad_(True)

    def _groups(self) -> list[dict]:
        """Alphas at ``alpha_lr`` (phase 2), everything else trainable at the task's learning rate."""
        alpha_ids = {id(p) for p in self.gate.alpha.values()}
        params = [p for p in self.net.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) not in alpha_ids]},
                {"params": [p for p in params if id(p) in alpha_ids], "lr": self.cfg.alpha_lr}]

    def train_task(self, task: int, loader) -> None:
        c = self.cfg
        epochs = self.epochs(task)
        self.gate.noise = True
        if task == 0 or not c.two_phase:
            self.set_trainable(logits=True, alphas=True, adapter=True)
            self.fit(task, loader, self.param_groups(), epochs, f"Task {task}",
                     extra_loss=self._sparsity, on_step=self._anneal)
            self.gate.tau_eval.fill_(self.gate.tau)
            self.decide(task)
            return
        e1 = math.ceil(c.phase1_fraction * epochs)
        self.set_trainable(logits=True, alphas=False, adapter=False)
        self.fit(task, loader, self.param_groups(), e1, f"Task {task} phase 1",
                 extra_loss=self._sparsity, on_step=self._anneal)
        self.gate.tau_eval.fill_(self.gate.tau)
        self.decide(task)
        # phase 2: beta fixed at its deterministic value at the tau phase 1 ended with
        self.gate.noise = False
        self.gate.tau = float(self.gate.tau_eval)
        self.set_trainable(logits=False, alphas=True, adapter=True)
        if epochs - e1 > 0:
            self.fit(task, loader, self._groups(), epochs - e1, f"Task {task} phase 2", extra_loss=self._alpha_l2)

    # ---- conditional growth ------------------------------------------------------------------------
    @torch.no_grad()
    def decide(self, task: int) -> list[int]:
        """Prune adapters by the configured rule and scope; returns the tasks pruned now."""
        c, gate = self.cfg, self.gate
        gated = gate.gated_tasks()
        tau = float(gate.tau_eval)
        n_all = gate.n_tasks
        rows = gate.n_layers if gate.granularity == "layer" else 1
        beta_full = torch.zeros(rows, n_all, device=self.device)
        freq_full = None
        pruned: list[int] = []
        if gated:
            idx = torch.tensor(gated, device=self.device)
            beta = gate.beta(tau, noise=False)                       # (rows, n)
            beta_full[:, idx] = beta
            score = beta.max(0).values                               # selected in any block
            if c.prune_rule == "frequency":
                logits = torch.stack([gate.logits[str(t)] for t in gated], -1)
                samples = gumbel_sparsemax(logits.expand(c.prune_samples, *logits.shape), tau, noise=True)
                freq = (samples > 0).any(1).float().mean(0)          # (n,)
                freq_full = torch.zeros(n_all, device=self.device)
                freq_full[idx] = freq
                drop = freq < c.prune_threshold
            else:
                drop = score <= c.growth_threshold
            if c.prune_scope == "new":
                drop &= idx == task
            drop[score.argmax()] = False                             # the top adapter always stays
            pruned = [t for t, d in zip(gated, drop.tolist()) if d]
            gate.prune(pruned)
            self.net.backbone.configure()
        self.decision = {"beta_values": beta_full.squeeze(0) if rows == 1 else beta_full,
                         "selection_freq": freq_full, "tau": tau,
                         "gated": torch.tensor([t in gated for t in range(n_all)])}
        self._print_decision(task, pruned, beta_full, freq_full)
        return pruned

    def _print_decision(self, task, pruned, beta_full, freq_full) -> None:
        c = self.cfg
        shown = beta_full.max(0).values.cpu().numpy()
        log.info(f"[Conditional Growth] Task {task} - Beta values: "
                 f"[{' '.join(f'{b:.4f}' for b in shown)}]")
        if c.prune_rule == "frequency":
            log.info(f"[Conditional Growth] Pruning rule: selection frequency < {c.prune_threshold} "
                     f"over {c.prune_samples} samples")
        else:
            log.info(f"[Conditional Growth] Pruning threshold: {c.growth_threshold:.1e} (sparsemax zeros)")
        if self.cfg.gate_scope == "previous" and self.gate.current is not None:
            log.info(f"[Conditional Growth] Task {task}'s own adapter is not gated (gate_scope previous): "
                     "its beta is shown as 0, its g is 1")
        for t in pruned:
            extra = f", freq={float(freq_full[t]):.2f}" if freq_full is not None else ""
            log.info(f"✗ Pruned task {t} (beta={shown[t]:.6f} ≈ 0{extra})")
        n_act, n = len(self.gate.active_tasks()), self.gate.n_tasks
        log.info(f"[Conditional Growth] Active: {n_act}/{n} ({100.0 * n_act / n:.1f}%)")

    # ---- persistence -------------------------------------------------------------------------------
    def end_task(self, task: int) -> None:
        """Write pruning_mask.pt and beta_values_task_{t}.pt (atomically), then freeze the adapter."""
        gate = self.gate
        n = gate.n_tasks
        record = {
            "task": task,
            "beta_values": self.decision["beta_values"].cpu(),
            "pruning_mask": gate.pruning_mask.cpu().clone(),
            "gated": self.decision["gated"],
            "selection_freq": None if self.decision["selection_freq"] is None
            else self.decision["selection_freq"].cpu(),
            "tau": self.decision["tau"],
            "alpha": gate.alphas(list(range(n))).detach().cpu(),
            "logits": torch.stack([gate.logits[str(t)] for t in range(n)]).detach().cpu(),
            "prune_rule": self.cfg.prune_rule,
        }
        save_torch(self.run_dir / f"beta_values_task_{task}.pt", record)
        save_torch(self.run_dir / "pruning_mask.pt", gate.pruning_mask.cpu().clone())
        super().end_task(task)

    def restore(self, dm, done: int) -> None:
        """Resume: the mask file is rewritten from the last completed task's checkpoint first, since a
        crash during that task's successor may have left a later decision in it."""
        ck = load_tensors(self.run_dir / f"task_{done}.safetensors")
        save_torch(self.run_dir / "pruning_mask.pt", ck["gate.pruning_mask"].clone())
        super().restore(dm, done)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        n = self.gate.n_tasks
        return {"gate.logits": torch.stack([self.gate.logits[str(t)] for t in range(n)]),
                "gate.tau_eval": self.gate.tau_eval}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for t, row in enumerate(tensors["gate.logits"]):
            self.gate.logits[str(t)].copy_(row)
        self.gate.tau_eval.copy_(tensors["gate.tau_eval"])
