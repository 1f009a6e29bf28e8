"""The catalog of switchable historical KVM shadow-MMU bugs; docs/bugs.md is generated from it
(``fuzzmmu bugs --markdown > docs/bugs.md``, :func:`catalog_markdown`).

Each mutant is the pre-fix code path at the place KVM had it; the model tests a BugSet
attribute there. Enabling a mutant changes what the model does, never what the oracle expects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Bug:
    id: str
    attr: str  # the BugSet switch the model tests
    summary: str
    fix: str  # fixing commit and subject, as far as known
    year: str
    seed: bool  # one of the five bugs of the project's seed documents
    needs: tuple[str, ...]  # model features the reproducer exercises
    pending: str = ""  # why the mutant is not available yet; empty when it is

    @property
    def available(self) -> bool:
        return not self.pending


CATALOG: Final[tuple[Bug, ...]] = (
    # --- the five bugs of the seed documents
    Bug("misaligned-pt-write-two-sptes", "pte_write_no_misaligned_check",
        "an emulated PT write crossing a gpte boundary invalidates only the first gpte's spte",
        "0e7bc4b9610e KVM: MMU: Handle misaligned accesses to write protected guest page tables",
        "2007", True, ("pte-write",)),
    Bug("nonpae-pde-write-wrong-spte", "nonpae_pde_single_spte",
        "a write to a 32-bit guest PDE zaps one spte at a singly-doubled offset instead of two",
        "ac1b714e78c8 KVM: MMU: Fix guest writes to nonpae pde", "2007", True,
        ("pte-write", "32bit")),
    Bug("walk-addr-access-checks.accessed-bit", "walk_sets_accessed_early",
        "the guest walker sets Accessed bits level by level before the access is known to "
        "succeed", "KVM: MMU: Perform access checks in walk_addr() (hash not identified)",
        "2007", True, ("walker",)),
    Bug("walk-addr-access-checks.error-code", "walk_error_code_from_hardware",
        "the #PF injected for a guest fault carries the shadow fault's error code (P=0 when "
        "no spte existed) instead of the guest walk's",
        "KVM: MMU: Perform access checks in walk_addr() (hash not identified)", "2007", True,
        ("walker",)),
    Bug("walk-addr-access-checks.fixed-fault", "walk_checks_leaf_only",
        "the walker checks rights against the leaf gpte only: a fault due to an upper level "
        "is not reflected, the spte keeps it, and the guest re-faults without end",
        "KVM: MMU: Perform access checks in walk_addr() (hash not identified)", "2007", True,
        ("walker",)),
    Bug("mmio-spte-lockless-race.zapped-spte", "mmio_zapped_spte_is_error",
        "an MMIO fault whose spte was zapped concurrently is reported as a misconfiguration "
        "instead of retried", "review of ce88decffd17 KVM: MMU: mmio page fault support "
        "(unverified)", "2011", True, ("mmio", "interleaving")),
    Bug("mmio-spte-lockless-race.rewalk", "mmio_emulation_rewalks",
        "MMIO emulation translates the gva again instead of using the gfn the MMIO spte held, "
        "so a concurrent remap sends the access to the new target",
        "review of ce88decffd17 KVM: MMU: mmio page fault support (unverified)", "2011", True,
        ("mmio", "interleaving"),
        "not observable by an architectural oracle: the access then behaves as if it ran "
        "after the concurrent remap, an order the architecture allows (one instruction, one "
        "access)"),
    Bug("wp-all-address-spaces", "wp_one_address_space",
        "a newly shadowed gfn is write-protected (and write tracking checked) in one address "
        "space only",
        "0f38453cdb2e KVM: x86/mmu: Check write tracking in all address spaces (and the 2022 "
        "account_shadowed() review)", "2022", True, ("smm",)),
    # --- later bugs of the same machinery
    Bug("inherited-access-shared-pt", "inherited_access_leaf_level",
        "intermediate shadow pages get the access of all non-leaf levels, so tables shared by "
        "parents with different rights share one page (CVE-2021-38198)",
        "b1bd5cba3306 KVM: X86: MMU: Use the correct inherited permissions to get shadow page",
        "2021", False, ("4level",)),
    Bug("emulated-pte-update-ignores-role-access", "pte_update_ignores_role_access",
        "the update-on-write path installs the new gpte's rights without the parents' "
        "restrictions", "41074d07c78b KVM: MMU: Fix inherited permissions for emulated guest "
        "pte updates", "<=2009", False, ("pte-write", "update-policy")),
    Bug("direct-sp-dirty-write-corruption", "no_validate_direct_spte",
        "a read-only direct shadow page made for a clean large gpte is reused writable after "
        "the gpte becomes dirty", "9e7b0e7fba45 KVM: MMU: fix direct sp's access corrupted",
        "2010", False, ("large-pages",)),
    Bug("efer-nxe-not-in-role", "efer_nx_not_in_role",
        "shadow pages built with EFER.NXE=1 are reused after the guest clears NXE (also what "
        "modern KVM does: kvm_init_shadow_mmu() forces role.efer_nx=1)",
        "9645bb56b31a KVM: MMU: Use different shadows when EFER.NXE changes", "2009", False,
        ("efer",)),
    Bug("cr0wp-not-in-role", "cr0_wp_not_in_role",
        "a page converted to a writable kernel page under CR0.WP=0 is reused after WP=1",
        "KVM: MMU: Segregate shadow pages with different cr0.wp (hash not identified)",
        "~2010", False, ("cr0-wp",)),
    Bug("smap-andnot-wp-not-in-role", "smap_andnot_wp_not_in_role",
        "a kernel page converted under CR0.WP=0 with SMAP off is reused once SMAP is on",
        "0be0226f07d1 KVM: MMU: fix SMAP virtualization", "2015", False, ("smap", "cr0-wp")),
    Bug("nonpae-quadrant-alias-update", "no_quadrant_filter",
        "a 32-bit guest PT write is applied to every quadrant's shadow page (aliases updated "
        "under the update policy)", "fce0657ff9f1 KVM: MMU: Respect nonpae pagetable quadrant "
        "when zapping ptes", "2007", False, ("pte-write", "32bit", "update-policy")),
    Bug("cr3-outside-memslots-trusted", "cr3_outside_memslots_trusted",
        "a root gfn outside every memslot gets a shadow page (KVM oopses on the missing "
        "memslot) instead of the dummy root",
        "8986ecc0ef58 KVM: x86: check for cr3 validity in mmu_alloc_roots", "2013", False,
        ("memslots",)),
    Bug("link-unsync-sp-without-sync", "link_unsync_without_sync",
        "an upper-level page with unsync children is linked without syncing them",
        "65855ed8b034 KVM: X86: Synchronize the shadow pagetable before link it", "2021", False,
        ("unsync",)),
    Bug("no-remote-flush-on-permission-reduction", "local_flush_only",
        "reducing spte permissions (write protection, zaps) flushes only the local TLB",
        "kvm-28 KVM: Flush remote tlbs when reducing shadow pte permissions", "2007", False,
        ("smp",)),
    Bug("stale-gpte-revalidation-skipped", "gpte_recheck_only_new",
        "FNAME(fetch) re-reads a gpte after write-protecting its table only when the shadow "
        "page was just created", "f7d9c7b7b902 KVM: MMU: Fix race when instantiating a shadow "
        "pte", "2008", False, ("smp", "interleaving")),
    Bug("mmio-generation-wrap-window", "mmio_gen_published_before_zap",
        "the new memslot generation is visible before MMIO sptes are zapped on a wrap",
        "152482580a1b KVM: Call kvm_arch_memslots_updated() before updating memslots", "2019",
        False, ("mmio", "memslots", "interleaving")),
    # --- where current KVM (v6.10, as modelled) departs from the SDM; the clean model follows
    # the SDM, these mutants are KVM as it is
    Bug("kvm.fetch-errcode-32bit-nxe", "fetch_errcode_32bit_nxe",
        "with 32-bit paging and EFER.NXE=1, #PF error codes of fetches carry I/D (the SDM "
        "sets it only with PAE/long paging or SMEP)", "open: FNAME(walk_addr_generic) uses "
        "cpu_role.base.efer_nx, which kvm_calc_cpu_role() sets for 32-bit paging too",
        "current", False, ("32bit", "walker")),
    Bug("kvm.pte-write-widen-misaligned", "pte_write_widen_misaligned",
        "a 4-byte PT write by a PAE/long-mode vCPU is widened to the aligned 8 bytes before "
        "detect_write_misaligned(), so a write straddling two gptes zaps one spte",
        "open: mmu_pte_write_fetch_gpte() widens every 4-byte write", "current", False,
        ("pte-write",)),
    Bug("kvm.cr4-pse-not-in-role", "cr4_pse_not_in_role",
        "shadow pages of a 32-bit guest are shared across CR4.PSE, so a PDE with PS=1 keeps "
        "mapping a 4 MiB page for a vCPU (or after a toggle) that must walk it as a table",
        "open: kvm_mmu_page_role has no CR4.PSE bit (found by fuzzmmu's clean-model soak)",
        "current", False, ("32bit",)),
    Bug("kvm.pae-shares-long-mode-pages", "pae_shares_long_mode_pages",
        "shadow pages of page tables are shared between 4-level and PAE paging, so a gpte with "
        "a bit in 62:52 (ignored in long mode, reserved in PAE) stays mapped for a PAE vCPU "
        "that must take a reserved-bit #PF on it",
        "open: kvm_mmu_page_role has no paging-mode bit beyond the level and has_4_byte_gpte "
        "(found by fuzzmmu's generator soak)", "current", False, ("pae", "4level")),
    Bug("kvm.pae-root-entry-stays-invalid", "pae_root_entry_stays_invalid",
        "a PAE root entry left invalid because its PDPTE's gfn was outside the memslots when "
        "the root was loaded stays invalid after a memslot makes the gfn visible: the next "
        "access through it WARNs in FNAME(fetch) and KVM_RUN fails with -EFAULT",
        "open: mmu_alloc_shadow_roots() zeroes the PDPTRs of invisible gfns, and only dummy "
        "roots are reloaded on memslot creation (found by fuzzmmu's clean campaign)",
        "current", False, ("pae", "memslots")),
    Bug("kvm.smap-ac-wp0-conversion", "smap_ac_wp0_conversion",
        "with CR0.WP=0 and SMAP on, a supervisor write with EFLAGS.AC=1 to a read-only user "
        "page makes it a writable kernel page, so later supervisor accesses with AC=0 get no "
        "SMAP fault", "open: FNAME(page_fault)'s CR0.WP=0 conversion has no SMAP case (found "
        "by fuzzmmu's scenario tests)", "current", False, ("smap", "cr0-wp")),
    Bug("kvm.pae-root-needs-pdpt-memslot", "pae_root_needs_pdpt_memslot",
        "a PAE guest whose PDPT page is no longer in a memslot gets a dummy root and retries "
        "every fault forever, though its PDPTE registers are valid",
        "open: mmu_alloc_shadow_roots() checks the CR3 gfn before handling PAE (older kernels "
        "injected a triple fault from mmu_check_root())", "current", False, ("pae", "memslots")),
    Bug("kvm.mmio-cache-outlives-walk", "mmio_cache_outlives_walk",
        "after the guest remaps an MMIO address without INVLPG, the vCPU's MMIO gva cache "
        "survives the fault-path walk of the new tables: the walk sets A/D bits in the new "
        "entries, and when the access is then emulated (say a write to a shadowed page table "
        "the address now maps) it goes to the old MMIO gfn",
        "open: FNAME(page_fault) never clears the MMIO info, and "
        "kvm_inject_emulated_page_fault() invalidates the address only for present, "
        "non-reserved faults (found by fuzzmmu's Atheris harness)", "current", False,
        ("mmio",)),
    Bug("kvm.mmio-cache-write-skips-dirty", "mmio_cache_write_skips_dirty",
        "with CR0.WP=0, a supervisor write through the MMIO gva cache to a page whose gpte is "
        "read-only or clean is emulated without walking the guest tables, so the gpte's D bit "
        "stays clear",
        "open: vcpu_mmio_gva_to_gpa() trusts the cached access whenever permission_fault() "
        "allows the write, and with CR0.WP=0 it allows a supervisor write to a read-only page "
        "(found by fuzzmmu's Atheris harness)", "current", False, ("mmio", "cr0-wp")),
    Bug("kvm.mmio-cache-ignores-smm", "mmio_cache_ignores_smm",
        "a gfn cached as MMIO outside SMM still matches the vCPU's MMIO cache in SMM, where "
        "it is SMRAM: an emulated SMRAM access there (say a write to a shadowed page table) "
        "exits as MMIO",
        "open: vcpu_match_mmio_gpa() compares the gfn and address space 0's generation only, "
        "and kvm_smm_changed() -> kvm_mmu_unload() clears only the cached gva (found by "
        "fuzzmmu's Atheris harness)", "current", False, ("mmio", "smm")),
    Bug("kvm.mmio-cache-smm-memslot-gen", "mmio_cache_smm_memslot_gen",
        "the vCPU's MMIO cache is tagged with address space 0's memslot generation, so in SMM "
        "a memslot change of the SMM address space leaves a cached MMIO translation valid: a "
        "gfn that is RAM again still exits as MMIO",
        "open: vcpu_cache_mmio_info() and vcpu_match_mmio_gen() use kvm_memslots() (address "
        "space 0) whatever the vCPU's address space (found by hand, issue tracker)", "current",
        False, ("mmio", "smm", "memslots")),
    Bug("kvm.dirty-bit-before-retry", "dirty_bit_before_retry",
        "the fault path's guest walk sets the leaf gpte's D bit for a write before the fault is "
        "fixed; when the fault is retried because another vCPU changed the guest's tables "
        "meanwhile, the re-executed write faults (or goes elsewhere) and D stays set though "
        "nothing was written through that gpte",
        "open: FNAME(walk_addr_generic) calls FNAME(update_accessed_dirty_bits) before "
        "FNAME(fetch)'s gpte_changed() may retry (found by fuzzmmu's random engine)",
        "current", False, ("walker", "interleaving")),
    Bug("kvm.mmio-spte-counts-as-writable", "mmio_spte_counts_as_writable",
        "a stale MMIO spte whose cached access has W is replaced by a RAM spte (the gfn is RAM "
        "again) without the write-protection check, because make_spte() takes it for an "
        "already writable spte: a guest page table reached there is written without KVM "
        "seeing it, and the shadow of it goes stale",
        "open: make_spte() skips mmu_try_to_unsync_pages() when is_writable_pte(old_spte), "
        "and mmu_set_spte() passes a non-present (MMIO) old spte too (found by fuzzmmu's "
        "clean-model soak with the audit; as read in v6.10 sources, not checked on a KVM with "
        "MMIO caching)", "current", False, ("mmio", "memslots", "smm")),
    Bug("kvm.not-present-pf-keeps-unsync-spte", "pf_invalidates_present_only",
        "a #PF KVM injects for a not-present or reserved-bit gpte leaves the address's spte as "
        "it was: in an unsync page that spte may still map the page the guest has just taken "
        "a #PF on, and the next access goes through it (the SDM has every #PF invalidate the "
        "faulting address's translations)",
        "open: kvm_inject_emulated_page_fault() calls kvm_mmu_invalidate_addr() only when the "
        "error code has P and not RSVD (found by fuzzmmu's random engine with unsync pages)",
        "current", False, ("unsync", "walker")),
    Bug("mmio-spte-over-present-spte", "mmio_spte_over_present_spte",
        "a fault that resolves to MMIO writes the MMIO spte over a present spte without "
        "dropping it first: its rmap entry stays behind (with unsync pages a guest store can "
        "get there: the gpte of a stale unsync spte now points outside every memslot)",
        "KVM: x86/mmu: Drop/zap existing present SPTE even when creating an MMIO SPTE "
        "(2026, fixes a54aa15c6bda3)", "2021", False, ("unsync", "mmio")),
    Bug("kvm.resync-wp-one-address-space", "resync_wp_one_address_space",
        "syncing an unsync page write-protects its gfn only in the syncing vCPU's address "
        "space: a writable spte for the gfn in the other address space (SMM) survives, and "
        "guest stores through it change a page KVM now believes in sync",
        "open: mmu_sync_children() calls kvm_vcpu_write_protect_gfn(), which looks up the "
        "vCPU's memslots, while account_shadowed() protects every address space since "
        "0f38453cdb2e (found by fuzzmmu's structural audit with unsync pages)",
        "current", False, ("unsync", "smm")),
    Bug("kvm.sync-mmio-spte-refreshes-generation", "sync_mmio_spte_refreshes_generation",
        "syncing an unsync page re-marks an MMIO spte with the current memslot generation "
        "without asking whether it was stale: when a memslot created since made its gfn RAM, "
        "the refreshed spte sends the guest's accesses there to the VMM as MMIO",
        "open: sync_mmio_spte() calls mark_mmio_spte() for any MMIO spte whose gfn the gpte "
        "still names (found by fuzzmmu's soak with unsync pages)", "current", False,
        ("unsync", "mmio", "memslots")),
)

_BY_ID: Final = {b.id: b for b in CATALOG}
_SWITCHES: Final = tuple(b.attr for b in CATALOG if b.available)


class UnknownBugError(ValueError):
    """A bug id that is not in the catalog (or not available yet)."""


class BugSet:
    """Which mutants are on. Attribute tests keep the switches cheap on hot paths; each switch
    is declared, so that a misspelt one in the model is a type error (and the import below
    fails if the declarations and the catalog part)."""

    __slots__ = (*_SWITCHES, "ids")
    pte_write_no_misaligned_check: bool
    nonpae_pde_single_spte: bool
    walk_sets_accessed_early: bool
    walk_error_code_from_hardware: bool
    walk_checks_leaf_only: bool
    mmio_zapped_spte_is_error: bool
    wp_one_address_space: bool
    inherited_access_leaf_level: bool
    pte_update_ignores_role_access: bool
    no_validate_direct_spte: bool
    efer_nx_not_in_role: bool
    cr0_wp_not_in_role: bool
    smap_andnot_wp_not_in_role: bool
    no_quadrant_filter: bool
    cr3_outside_memslots_trusted: bool
    local_flush_only: bool
    gpte_recheck_only_new: bool
    mmio_gen_published_before_zap: bool
    fetch_errcode_32bit_nxe: bool
    pte_write_widen_misaligned: bool
    cr4_pse_not_in_role: bool
    pae_shares_long_mode_pages: bool
    pae_root_entry_stays_invalid: bool
    smap_ac_wp0_conversion: bool
    pae_root_needs_pdpt_memslot: bool
    mmio_cache_outlives_walk: bool
    mmio_cache_write_skips_dirty: bool
    mmio_cache_ignores_smm: bool
    mmio_cache_smm_memslot_gen: bool
    mmio_spte_counts_as_writable: bool
    dirty_bit_before_retry: bool
    link_unsync_without_sync: bool
    pf_invalidates_present_only: bool
    mmio_spte_over_present_spte: bool
    resync_wp_one_address_space: bool
    sync_mmio_spte_refreshes_generation: bool

    def __init__(self, ids: Iterable[str] = ()) -> None:
        for attr in _SWITCHES:
            setattr(self, attr, False)
        chosen = []
        for bug_id in ids:
            bug = lookup(bug_id)
            if not bug.available:
                raise UnknownBugError(f"bug {bug_id!r} is pending: {bug.pending}")
            setattr(self, bug.attr, True)
            chosen.append(bug.id)
        self.ids: tuple[str, ...] = tuple(sorted(set(chosen)))

    def __repr__(self) -> str:
        return f"BugSet({list(self.ids)})"


def lookup(bug_id: str) -> Bug:
    bug = _BY_ID.get(bug_id)
    if bug is None:
        known = ", ".join(sorted(_BY_ID))
        raise UnknownBugError(f"unknown bug id {bug_id!r}; known ids: {known}")
    return bug


NO_BUGS: Final = BugSet()

# A BugSet is never changed once made: the executor takes one per program from here.
_BUGSETS: Final[dict[tuple[str, ...], BugSet]] = {}


def bugset(ids: Iterable[str] = ()) -> BugSet:
    """The BugSet of ``ids`` (shared: a BugSet is read-only), checked as BugSet checks them."""
    key = tuple(ids)
    found = _BUGSETS.get(key)
    if found is None:
        if len(_BUGSETS) >= 256:  # a process that tries many combinations starts afresh
            _BUGSETS.clear()
        found = _BUGSETS[key] = BugSet(key)
    return found

_GROUPS: Final = (
    ("The seed bugs", "The five bugs the project started from (`seed` in the catalog; one of "
     "them is three mutants, another two)."),
    ("Later bugs of the same machinery", "Historical KVM bugs fixed after the seed ones, in "
     "the same code paths."),
    ("Where current KVM departs from the architecture", "KVM as read (v6.10) does this "
     "today; the clean model follows the architecture instead (`docs/model.md §11`)."),
)


def catalog_markdown() -> str:
    """docs/bugs.md: the catalog as a document (``fuzzmmu bugs --markdown``)."""
    out = ["<!-- Generated from fuzzmmu/model/bugs.py by `fuzzmmu bugs --markdown > "
           "docs/bugs.md`: edit the catalog, not this file. -->", "", "# The bug catalog", "",
           "Every mutant the model can re-create: the pre-fix code path at the place KVM had "
           "it, switched on by a `BugSet` attribute. `--bug ID` turns one on in `fuzzmmu replay`, "
           "`fuzz`, `triage`, `minimize`, `export` and `demo` (`fuzzmmu bench --bugs ID ...`); "
           "each available mutant has a reproducer, a program that diverges with it on and "
           "runs clean with it off.", "",
           "| mutant | year | group | available |", "|---|---|---|---|"]
    groups: list[list[Bug]] = [[], [], []]
    for bug in CATALOG:
        groups[0 if bug.seed else 2 if bug.id.startswith("kvm.") else 1].append(bug)
    for n, bugs in enumerate(groups, 1):
        out += [f"| `{b.id}` | {b.year} | {n} | {'yes' if b.available else 'pending'} |"
                for b in bugs]
    for n, ((title, intro), bugs) in enumerate(zip(_GROUPS, groups, strict=True), 1):
        out += ["", f"## {n}. {title}", "", intro]
        for b in bugs:
            out += ["", f"### `{b.id}` ({b.year})", "", b.summary[0].upper() + b.summary[1:]
                    + ".", "", f"- fix: {b.fix}", f"- switch: `BugSet.{b.attr}`",
                    f"- exercises: {', '.join(b.needs)}"]
            if b.available:
                path = f"tests/bugs/reproducers/{b.id}.txt"
                out.append(f"- reproducer: [{path}](../{path})")
            else:
                out.append(f"- pending: {b.pending}")
    return "\n".join(out) + "\n"
