"""Gumbel CL-LoRA: SD-LoRA whose adapters are gated by Gumbel-Sparsemax and pruned when unused.

SPEC section 3. Per task t >= 1 with ``two_phase``:
  warm-up (``warmup_fraction`` of the epochs, 0 in the notes): the new adapter, alphas and head train
      as in SD-LoRA with the new adapter ungated (g_t = 1), so that it is judged after it has learned;
  phase 1 (ceil(phase1_fraction * epochs) epochs): gate logits + head train, alphas and the new
      adapter frozen; loss = CE + lambda_sparsity * entropy(beta); tau anneals every step;
  growth decision: prune adapters by the threshold or frequency rule (never the top one);
  phase 2 (the rest): logits frozen, beta deterministic at the tau phase 1 ended with; alphas
      (group lr ``alpha_lr``), the new adapter (if kept; if pruned and ``skip_mode: "reuse"``, the
      latest kept adapter, reopened) and the head train with a fresh optimiser;
      loss = CE + lambda_alpha * sum(alpha^2).
``retrain``: after the decision the task starts over from the state it began with and trains the chosen
structure for all its epochs ("skip": only when the new adapter was pruned; "all": always), so that the
warm-up and phase 1 are a trial that costs epochs but leaves no half-trained head behind.
``selection_holdout``: the warm-up trains on all but a share of each class's images, and phase 1
judges on that share alone with the head frozen (the need of the adapter on images it has not fit).
Task 0, or ``two_phase: false``: one phase training everything, decision at the end.
After each task the mask and a beta log are written to the run folder; the mask file is read
back when the next task starts, so a pruned adapter never comes back.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from backbone.gate import GumbelGate
from models import register
from models.base import Learner, log, task_seed
from models.gumbel_keys import GumbelKeys, check_gumbel
from models.reuse import latest_adapter_before, skip_adapter
from models.task_state import restore, snapshot
from utils import dist
from utils.data.data_manager import split_per_class
from utils.gumbel_utils import gumbel_sparsemax, phase_temperature, sparsity_loss, temperature
from utils.io import load_tensors, save_torch


@register("gumbel_sdlora", keys=GumbelKeys, check=check_gumbel)
class GumbelSDLoRA(Learner):
    default_alpha = 1.0

    def make_gate(self, n_layers: int) -> GumbelGate:
        return GumbelGate(n_layers, self.cfg.gate_granularity, self.cfg.gate_scope)

    # ---- task start: mask from disk, schedule reset --------------------------------------------
    def begin_task(self, task: int, n_new_classes: int) -> None:
        super().begin_task(task, n_new_classes)
        self._load_mask_file()
        self.growth_cost = self.cfg.growth_cost
        self.step = 0
        self.decision: dict = {}
        self.probe: dict = {}

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
        if c.gumbel_tau_schedule == "phase":
            self.gate.tau = phase_temperature(self.step, self.phase_steps, c.gumbel_tau_init, c.gumbel_tau_final)
        else:
            self.gate.tau = temperature(self.step, c.gumbel_tau_init, c.gumbel_tau_final, c.gumbel_anneal_rate)
        self.step += 1

    def _gate_loss(self) -> torch.Tensor:
        """lambda_sparsity * entropy(beta) + growth_cost * (the new adapter's gate value)."""
        c = self.cfg
        beta = self.net.backbone.last_beta
        if beta is None:
            return torch.zeros((), device=self.device)
        loss = c.lambda_sparsity * sparsity_loss(beta, c.sparsity_eps)
        gated = self.gate.gated_tasks()
        if self.growth_cost and self.gate.current in gated:
            loss = loss + self.growth_cost * beta[:, gated.index(self.gate.current)].mean()
        return loss

    def task_growth_cost(self, task: int) -> float:
        """growth_cost, divided with ``cost_by_share`` by the number of tasks the adapter a skip would
        reopen already serves: sharing an adapter gets dearer, so a new one gets cheaper."""
        c = self.cfg
        latest = latest_adapter_before(self.net.backbone, task)
        if not c.cost_by_share or latest is None:
            return c.growth_cost
        return c.growth_cost / self.net.backbone.tasks_served(latest)

    def epoch_scalars(self) -> dict[str, float]:
        """The temperature and, while the new adapter is gated, its beta at the epoch's last step."""
        out = {"gate/tau": float(self.gate.tau)}
        beta, gated = self.net.backbone.last_beta, self.gate.gated_tasks()
        if beta is not None and self.gate.current in gated:
            out["gate/beta_new"] = float(beta.detach()[:, gated.index(self.gate.current)].mean())
        return out

    def _alpha_l2(self) -> torch.Tensor:
        alphas = [a for a in self.gate.alpha.values() if a.requires_grad]
        if not alphas:
            return torch.zeros((), device=self.device)
        return self.cfg.lambda_alpha * torch.stack(alphas).square().sum()

    # ---- what trains when --------------------------------------------------------------------------
    def set_trainable(self, logits: bool, alphas: bool, adapter: bool, head: bool = True) -> None:
        """requires_grad per role; pruned adapters' alphas and logits never train."""
        active, gated = set(self.gate.active_tasks()), set(self.gate.gated_tasks())
        for k, p in self.gate.logits.items():
            p.requires_grad_(logits and int(k) in gated)
        for k, p in self.gate.alpha.items():
            p.requires_grad_(alphas and int(k) in active)
        cur = self.gate.current
        kept = cur is not None and cur in active
        for layer in self.net.backbone.layers:
            for d in (layer.lora_A, layer.lora_B):
                for k, p in d.items():
                    p.requires_grad_(adapter and kept and int(k) == cur)
        for p in self.net.head.parameters():
            p.requires_grad_(head)

    def _groups(self, alpha_lr: Optional[float] = None) -> list[dict]:
        """Every trainable tensor at the task's learning rate, except the logits (``gate_lr``, when set)
        and, given ``alpha_lr`` (phase 2), the alphas."""
        own = {}
        if alpha_lr is not None:
            own.update({id(p): alpha_lr for p in self.gate.alpha.values()})
        if self.cfg.gate_lr is not None:
            own.update({id(p): self.cfg.gate_lr for p in self.gate.logits.values()})
        params = [p for p in self.net.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in own]}]
        for lr in sorted(set(own.values())):
            mine = [p for p in params if own.get(id(p)) == lr]
            if mine:
                groups.append({"params": mine, "lr": lr})
        return groups

    def train_task(self, task: int, loader) -> None:
        c, gate = self.cfg, self.gate
        epochs = self.epochs(task)
        gate.noise, gate.ungated = True, False
        if task == 0 or not c.two_phase:
            # scope 'new' has nothing to weigh the first adapter against: it trains ungated and stays
            gate.ungated = task == 0 and c.gate_scope == "new"
            self.set_trainable(logits=True, alphas=True, adapter=True)
            self.phase_steps = len(loader) * epochs
            self.fit(task, loader, self._groups(), epochs, f"Task {task}",
                     extra_loss=self._gate_loss, on_step=self._anneal)
            gate.tau_eval.fill_(gate.tau)
            self.decide(task)
            gate.ungated = False
            return
        e_w = math.ceil(c.warmup_fraction * epochs)
        e1 = math.ceil(c.phase1_fraction * epochs)
        start = self.task_start_state(task) if c.retrain != "none" else None
        held = c.selection_holdout > 0
        learn, judge = self.holdout_split(task, loader) if held else (loader, loader)
        if e_w:  # warm-up: the new adapter learns ungated; old adapters as inference sees them
            gate.ungated, gate.noise, gate.tau = True, False, float(gate.tau_eval)
            self.set_trainable(logits=False, alphas=True, adapter=True)
            self.fit(task, learn, self._groups(), e_w, f"Task {task} warm-up")
            self._probe_need(task, judge, batches=len(judge) if held else 2)
            gate.ungated, gate.noise = False, True
        # phase 1, selection; with selection_holdout on the held-out images, where only the logits train
        # (a head trained there would learn the very images that judge), for e1 epochs' worth of steps
        self.growth_cost = self.task_growth_cost(task)
        self.set_trainable(logits=True, alphas=False, adapter=False, head=not held)
        passes = e1 * math.ceil(len(loader) / len(judge)) if held else e1
        self.phase_steps = len(judge) * passes
        self.fit(task, judge, self._groups(), passes, f"Task {task} phase 1",
                 extra_loss=self._gate_loss, on_step=self._anneal)
        gate.tau_eval.fill_(gate.tau)
        skipped = task in self.decide(task)
        e2 = epochs - e_w - e1
        if c.retrain == "all" or (c.retrain == "skip" and skipped):
            self.load_task_start_state(task, start)  # the trial is over: the chosen structure trains from scratch
            e2 = epochs
        if skipped and c.skip_mode == "reuse":
            skip_adapter(self.net.backbone, task, reuse=True)  # phase 2 trains the latest kept adapter instead
        # phase 2: beta fixed at its deterministic value at the tau phase 1 ended with (scope 'new':
        # the decision is made, the kept adapter has g = 1)
        gate.noise, gate.ungated = False, c.gate_scope == "new"
        gate.tau = float(gate.tau_eval)
        self.set_trainable(logits=False, alphas=True, adapter=True)
        if e2 > 0:
            self.fit(task, loader, self._groups(c.alpha_lr), e2, f"Task {task} phase 2",
                     extra_loss=self._alpha_l2)
        gate.ungated = False

    def task_start_state(self, task: int) -> dict[str, torch.Tensor]:
        """Copies of what a task trains (head, magnitudes, its own adapter), as the task found them."""
        return snapshot(self, task)

    def load_task_start_state(self, task: int, state: dict[str, torch.Tensor]) -> None:
        restore(self, task, state)

    def holdout_split(self, task: int, loader) -> tuple:
        """Loaders over the task's images minus a seeded ``selection_holdout`` share of each class, and
        over that share (at least one image of each class)."""
        ds = loader.dataset
        learn, judge = split_per_class(ds.labels, self.cfg.selection_holdout, task_seed(self.seed, task))
        return (self.loader(ds.subset(learn), train=True, task=task),
                self.loader(ds.subset(judge), train=True, task=task))

    @torch.no_grad()
    def _probe_need(self, task: int, loader, batches: int = 2) -> None:
        """Diagnostic after the warm-up: the task loss on a few training batches (on every held-out one
        with ``selection_holdout``) with the new adapter at g = 1 and at g = 0 (its alpha zeroed for the
        probe). Logged and kept in the beta record."""
        alpha = self.gate.alpha[str(task)]
        kept = alpha.detach().clone()
        lo = self.net.head.out_features - self.n_new
        sums, n = [0.0, 0.0], 0
        for i, (x, y) in enumerate(loader):
            if i == batches:
                break
            x, y = x.to(self.device), y.to(self.device)
            for j, scale in enumerate((1.0, 0.0)):
                alpha.copy_(kept * scale)
                with self._autocast():
                    sums[j] += float(self.task_loss(self.net(x).float(), y, task, lo)) * len(y)
            n += len(y)
        alpha.copy_(kept)
        self.probe = {"loss_with": sums[0] / n, "loss_without": sums[1] / n}
        log.info(f"[Conditional Growth] Task {task} after warm-up: loss with the new adapter "
                 f"{self.probe['loss_with']:.4f}, without {self.probe['loss_without']:.4f}")

    # ---- conditional growth ------------------------------------------------------------------------
    @torch.no_grad()
    def decide(self, task: int) -> list[int]:
        """Prune adapters by the configured rule and scope; returns the tasks pruned now."""
        c, gate = self.cfg, self.gate
        gated = gate.gated_tasks()
        tau = float(gate.tau_eval)
        n_all = gate.n_tasks
        rows = gate.rows
        beta_full = torch.zeros(rows, n_all, device=self.device)
        freq_full = None
        pruned: list[int] = []
        if gated:
            idx = torch.tensor(gated, device=self.device)
            n = len(gated)
            beta = gate.beta(tau, noise=False)[:, :n]                # (rows, n); scope 'new' drops the skip
            beta_full[:, idx] = beta
            score = beta.max(0).values                               # selected in any block
            if c.prune_rule == "frequency":
                logits = torch.stack([gate.logits[str(t)] for t in gated], -1)
                if c.gate_scope == "new":
                    logits = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], -1)
                samples = gumbel_sparsemax(logits.expand(c.prune_samples, *logits.shape), tau, noise=True)
                freq = (samples[..., :n] > 0).any(1).float().mean(0)  # (n,)
                freq_full = torch.zeros(n_all, device=self.device)
                freq_full[idx] = freq
                drop = freq < c.prune_threshold
            else:
                drop = score <= c.growth_threshold
            if c.prune_scope == "new":
                drop &= idx == task
            if c.gate_scope != "new":  # the top adapter always stays (with 'new' the old ones do)
                drop[score.argmax()] = False
            pruned = dist.broadcast([t for t, d in zip(gated, drop.tolist()) if d])  # taken once, by rank 0
            gate.prune(pruned)
            if c.gate_scope == "new":
                # binary decision: the losing option leaves the projection, as a pruned adapter does, so
                # a kept adapter is alone in the gate (sparsemax of one entry: g = 1) from now on
                gate.set_anchor(task, 0.0 if pruned else 1.0)
            self.net.backbone.configure()
        if c.gate_scope == "new":  # the g in force for adapters outside the gate: their anchors
            for t in gate.active_tasks():
                if t not in gated:
                    beta_full[:, t] = gate.anchor_of(t)
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
            "anchor": gate.anchor.cpu().clone(),
            "trained_adapter": self.net.backbone.owner(task),
            "growth_cost": self.growth_cost,
            **self.probe,
            "prune_rule": self.cfg.prune_rule,
            "gate_scope": self.cfg.gate_scope,
        }
        save_torch(self.run_dir / f"beta_values_task_{task}.pt", record)
        save_torch(self.run_dir / "pruning_mask.pt", gate.pruning_mask.cpu().clone())
        super().end_task(task)

    def restore(self, dm, done: int) -> None:
        """Resume: the mask file is rewritten from the last completed task's checkpoint first, since a
        crash during that task's successor may have left a later decision in it."""
        ck = load_tensors(self.run_dir / f"task_{done}.safetensors")
        save_torch(self.run_dir / "pruning_mask.pt", ck["gate.pruning_mask"].clone())
        dist.barrier()  # under torchrun, no rank reads the mask file before rank 0 has rewritten it
        super().restore(dm, done)
