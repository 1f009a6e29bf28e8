"""The guest's world: guest memory, memslots and host mappings as the VMM sets them, the fixed
layout every program starts from, and what a guest observes. It knows nothing of KVM: the
model (fuzzmmu.model), the reference (fuzzmmu.oracle.reference) and any other target build on
it."""
