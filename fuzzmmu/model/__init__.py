"""The model of KVM (the system under test): machine.py is the facade the executor drives,
x86.py KVM's x86.c (control registers, SMM, requests), emulator.py the slice of KVM's
emulator a fault leads to, hardware.py the host CPU walking the shadow tables, mmu/ KVM's
arch/x86/kvm/mmu/, bugs.py the catalog of switchable historical bugs. It never calls the
reference (fuzzmmu.arch's walker)."""
