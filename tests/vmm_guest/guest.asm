; Strata's bare-metal virtio-blk test guest.
;
; A flat binary laid out by hand as an ELF64 executable (so that both QEMU's `-kernel` and
; linux-loader's Elf loader take it) with one PT_LOAD segment at 1 MiB and one PT_NOTE
; segment holding the PVH entry note (name "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY).
; The code is 32-bit: it is entered by the PVH boot protocol in protected mode with paging
; off and %ebx pointing at struct hvm_start_info, and never leaves that mode.
;
; What it does: find the RSDP (start_info, else a scan of 0xE0000..0xFFFFF), walk
; XSDT/RSDT -> FADT -> DSDT, collect the Memory32Fixed bases of the `LNRO0005` (virtio-mmio)
; devices, bring up the first virtio-blk device (virtio-mmio version 2) with one split
; virtqueue, run the workload named on the command line (`test=...`), report on COM1 with
; lines starting "STRATA-GUEST:", and power off through the FADT's sleep control register.
; See README.md for the exact protocol.
;
; Build: tests/vmm_guest/build.sh OUTDIR   (nasm -f bin guest.asm)

bits 32
cpu 686

%include "layout.inc"

org IMAGE_BASE

; ---------------------------------------------------------------------------------------
; ELF64 header and program headers.
elf_header:
    db 0x7f, "ELF"
    db 2                            ; EI_CLASS: ELFCLASS64 (linux-loader reads only ELF64)
    db 1                            ; EI_DATA: little endian
    db 1                            ; EI_VERSION
    db 0                            ; EI_OSABI: System V
    times 8 db 0                    ; padding to 16 bytes
    dw 2                            ; e_type: ET_EXEC
    dw 62                           ; e_machine: EM_X86_64
    dd 1                            ; e_version
    dq pvh_entry                    ; e_entry (the PVH entry too; nothing enters in 64-bit mode)
    dq program_headers - elf_header ; e_phoff
    dq 0                            ; e_shoff: no section headers
    dd 0                            ; e_flags
    dw 64                           ; e_ehsize
    dw 56                           ; e_phentsize
    dw 2                            ; e_phnum
    dw 64                           ; e_shentsize
    dw 0                            ; e_shnum
    dw 0                            ; e_shstrndx

program_headers:
    ; PT_LOAD: the whole file at IMAGE_BASE, followed by the zero-filled work area.
    dd 1                            ; p_type: PT_LOAD
    dd 7                            ; p_flags: R W X
    dq 0                            ; p_offset
    dq IMAGE_BASE                   ; p_vaddr
    dq IMAGE_BASE                   ; p_paddr
    dq image_end - elf_header       ; p_filesz
    dq MEM_END - IMAGE_BASE         ; p_memsz
    dq 0x1000                       ; p_align
    ; PT_NOTE: the PVH entry note.
    dd 4                            ; p_type: PT_NOTE
    dd 4                            ; p_flags: R
    dq pvh_note - elf_header        ; p_offset
    dq pvh_note                     ; p_vaddr
    dq pvh_note                     ; p_paddr
    dq pvh_note_end - pvh_note      ; p_filesz
    dq pvh_note_end - pvh_note      ; p_memsz
    dq 4                            ; p_align

pvh_note:
    dd 4                            ; n_namesz: "Xen\0"
    dd 8                            ; n_descsz: the 32-bit entry, widened to 64 bits (QEMU
                                    ; reads 8 bytes from a 64-bit ELF, linux-loader 4)
    dd 18                           ; n_type: XEN_ELFNOTE_PHYS32_ENTRY
    db "Xen", 0
    dd pvh_entry, 0
pvh_note_end:

; ---------------------------------------------------------------------------------------
; Descriptor tables (static).
align 8
gdt:
    dq 0                            ; null
    dq 0x00cf9a000000ffff           ; 0x08: 32-bit code, base 0, limit 4 GiB
    dq 0x00cf92000000ffff           ; 0x10: data, base 0, limit 4 GiB
gdt_end:
gdt_ptr:
    dw gdt_end - gdt - 1
    dd gdt

CODE_SEL equ 0x08
DATA_SEL equ 0x10

; The IDT: 32 interrupt gates for the CPU exceptions, each to an 8-byte stub that reports
; the vector and stops. No external interrupt is ever enabled.
align 8
idt:
%assign v 0
%rep 32
    dw (exc_stubs - $$ + IMAGE_BASE + v * 8) & 0xffff
    dw CODE_SEL
    db 0, 0x8e                      ; present, DPL 0, 32-bit interrupt gate
    dw (exc_stubs - $$ + IMAGE_BASE + v * 8) >> 16
%assign v v + 1
%endrep
idt_end:
idt_ptr:
    dw idt_end - idt - 1
    dd idt

; ---------------------------------------------------------------------------------------
; PVH entry: 32-bit protected mode, flat segments, paging off, %ebx = hvm_start_info.
pvh_entry:
    cli
    cld
    lgdt [gdt_ptr]
    jmp CODE_SEL:.reload
.reload:
    mov eax, DATA_SEL
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov fs, eax
    mov gs, eax
    mov esp, STACK_TOP
    lidt [idt_ptr]
    mov ebp, ebx                    ; keep start_info
    ; Zero the variables (the work area past the image is zero when loaded, but a
    ; warm reset could re-enter with old contents).
    mov edi, VARS
    mov ecx, VARS_SIZE / 4
    xor eax, eax
    rep stosd
    mov [start_info], ebp
    call main
    ; not reached: main powers off
.stop:
    cli
    hlt
    jmp .stop

; Exception stubs: push the vector and join the common reporter.
align 8
exc_stubs:
%assign v 0
%rep 32
    push byte v
    jmp exc_common
    align 8
%assign v v + 1
%endrep

exc_common:
    ; stack: vector, [error code], eip, cs, eflags
    mov ebx, [esp]                  ; vector
    mov ecx, [esp + 4]              ; eip, or the error code
    mov edx, [esp + 8]              ; cs, or eip after an error code
    mov esp, STACK_TOP              ; a fresh stack: the old one may be what faulted
    SAY "FAIL exception "
    mov eax, ebx
    call putdec
    mov eax, 0x00227d00             ; vectors 8, 10-14, 17, 21 push an error code
    bt eax, ebx
    jc .has_error_code
    mov edx, ecx
.has_error_code:
    PUTS " eip="
    mov eax, edx
    call puthex
    call newline
    SAY "FAIL", 10
    jmp poweroff

%include "serial.inc"
%include "util.inc"
%include "acpi.inc"
%include "virtio.inc"
%include "main.inc"
%include "work_basic.inc"
%include "work_ro.inc"
%include "work_stamp.inc"
%include "work_hostile.inc"
%include "work_power.inc"

image_end:
; The image must stay below the work area.
times (image_end - $$ > WORK_START - IMAGE_BASE) * -1 db 0

%include "bss.inc"
