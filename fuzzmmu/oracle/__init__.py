"""The oracle: what decides that the model of KVM's shadow MMU went wrong.

Two independent judges. The differential one runs a program on the model machine and on the
architectural reference machine side by side and reports the first place they disagree
(``executor``, ``reference``, ``divergence``). The structural one, ``audit``, looks only at the
model's own state between operations and reports the shadow-MMU invariants of
docs/model.md §12 (write protection, counters, rmaps, parent links, keys, MMIO sptes,
roots, host TLBs) that the state breaks, whatever the guest observed.
"""
