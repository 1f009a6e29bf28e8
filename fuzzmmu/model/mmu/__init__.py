"""KVM's shadow MMU (arch/x86/kvm/mmu/): internal.py is mmu_internal.h, role/page/spte the
encodings, mmu.py mmu.c's page life cycle, context.py struct kvm_mmu, walk.py paging_tmpl.h's
guest walker, fault.py the fault path, pte_write.py emulated PT writes, mmio.py MMIO sptes."""
