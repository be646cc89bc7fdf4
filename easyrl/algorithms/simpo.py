"""SimPO: simple preference optimization with a reference-free, length-normalized reward and a
target margin (Meng et al. 2024): -log sig(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) -
gamma). The CPO trainer (easyrl/algorithms/cpo.py) with section `simpo`, loss type simpo, and
by default no NLL term (`simpo.cpo_alpha = 0`; TRL: CPOTrainer with loss_type="simpo",
cpo_alpha=0)."""
from easyrl.algorithms import cpo

ALGORITHM = cpo.record("simpo", 37, "SimPO: length-normalized reference-free preference "
                                    "optimization with a target margin")
train = ALGORITHM.train
