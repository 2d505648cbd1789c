/*
 * vmigrate's built-in test guest: the project's truth-teller.
 *
 * It rewrites a working set page by page at a chosen dirty rate, keeps
 * re-verifying every page, and reports over the serial port. After any
 * checkpoint, restore or migration the guest itself says whether anything
 * was lost:
 *
 *   HB cpu=C n=N ticks=T w=W v=V err=E ns=NS   heartbeat, N counts up by one
 *                                              (+ rtc=HH:MM:SS with the RTC on)
 *   CORRUPT cpu=C page=... expected=... found=...   a page holds a stale value
 *   CLOCK cpu=C backwards ...                  kvmclock went back in time
 *   ECHO <line>                                a line received on the UART
 *   FAULT vec=... err=... rip=...              an unexpected exception (then halts)
 *
 * Pattern: each CPU owns a slice of N pages and writes them round-robin.
 * With a cursor p and a generation g, page i holds generation g if i < p,
 * else g - 1. A page of generation gen is seeded by v = (gen << 32) |
 * (gpa >> 12): its first half is a splitmix64 stream from v, its second half
 * repeats v (so memory compresses about 2:1, like a real guest's); a page of
 * generation 0 is all zero. Two registers' worth of state predict the whole
 * slice, and any page the migration forgot shows up as an old generation.
 *
 * Pacing comes from timer interrupts (the PIT on CPU 0, the LAPIC timer on
 * the others), serial input from the UART interrupt through the IOAPIC: a
 * lost timer, irqchip or UART state shows up as a stalled heartbeat or a
 * missing echo. The main loop runs at CPL3 (IOPL=3 lets it use the serial
 * port directly); CPL0 runs only set-up and the interrupt handlers, which
 * matters on hosts where CPL0 code is emulated (see docs/vmm.md). When it
 * has nothing to do the loop executes `hlt`, which faults to CPL0, where
 * the #GP handler halts on its behalf until the next interrupt.
 *
 * The VMM enters every vCPU in 64-bit mode at `kernel_entry` with
 * RDI = CPU index and RSP = top of that CPU's kernel stack, after writing
 * GDT, TSSs, page tables and the parameter block. The `.set` lines below
 * are parsed by vmm/testguest/layout.py: they are the single source of truth
 * for addresses and offsets shared with the VMM.
 */
        .intel_syntax noprefix
        .code64

/* ---- layout shared with the VMM (parsed by layout.py) ---- */
        .set GDT_BASE,          0x1000
        .set IDT_BASE,          0x2000
        .set TSS_BASE,          0x3000
        .set TSS_STRIDE,        0x100   /* 104-byte TSS + I/O bitmap for ports 0-0x3ff */
        .set TSS_LIMIT,         0xe8
        .set SHARED,            0x6000
        .set PARAMS,            0x7000
        .set PML4_BASE,         0x8000
        .set PERCPU_BASE,       0x10000
        .set PERCPU_SHIFT,      14
        .set PERCPU_SIZE,       0x4000
        .set MAX_CPUS,          32
        .set CODE_BASE,         0x100000
        .set WS_BASE,           0x200000
        .set KERNEL_CS,         0x08
        .set KERNEL_DS,         0x10
        .set USER_DS,           0x1b
        .set USER_CS,           0x23
        .set TSS_SEL0,          0x28
        .set PARAMS_MAGIC,      0x5453455447494d56

/* parameter block at PARAMS (u64 each, written by the VMM) */
        .set P_MAGIC,           0x00
        .set P_NCPUS,           0x08
        .set P_HZ,              0x10
        .set P_WS_BASE,         0x18
        .set P_WS_PAGES,        0x20    /* pages per CPU */
        .set P_WRITE_FP,        0x28    /* pages per tick, 16.16 fixed point */
        .set P_VERIFY_PER_TICK, 0x30    /* pages verified per tick */
        .set P_HB_TICKS,        0x38    /* ticks between heartbeats */
        .set P_PIT_DIVISOR,     0x40
        .set P_LAPIC_COUNT,     0x48    /* LAPIC timer initial count (divide by 1) */
        .set P_KVMCLOCK,        0x50    /* 1: enable kvmclock and report ns */
        .set P_TIMER_PIN,       0x58    /* IOAPIC pin of the PIT */
        .set P_PROBE_SYSCALL,   0x60    /* 1: only probe whether CPL3 syscall works */
        .set P_USE_RTC,         0x68    /* 1: read the RTC in each heartbeat */
        .set P_FILL_ONCE,       0x70    /* 1: write the working set once, then only verify */

/* shared page */
        .set S_LOCK,            0x00
        .set S_IDT_READY,       0x08
        .set S_RX_HEAD,         0x10
        .set S_RX_TAIL,         0x18
        .set S_LINE_LEN,        0x20
        .set S_RX_RING,         0x100   /* 256 bytes */
        .set S_LINE,            0x200   /* 128 bytes */
        .set S_IDTR,            0x300

/* per-CPU block: kernel part, then user part */
        .set K_TICKS,           0x00
        .set K_CPU,             0x08
        .set K_PVCLOCK,         0x40    /* struct pvclock_vcpu_time_info, 32 bytes */
        .set KSTACK_TOP,        0x2000
        .set U_LAST_TICKS,      0x2000
        .set U_CREDIT,          0x2008
        .set U_CURSOR,          0x2010
        .set U_GEN,             0x2018
        .set U_WRITES,          0x2020
        .set U_VCURSOR,         0x2028
        .set U_HB,              0x2030
        .set U_NEXT_HB,         0x2038
        .set U_ERRORS,          0x2040
        .set U_SLICE_BASE,      0x2048
        .set U_SLICE_PAGES,     0x2050
        .set U_LAST_NS,         0x2058
        .set U_VERIFIED,        0x2060
        .set U_NUMBUF,          0x2100
        .set USTACK_TOP,        0x4000

/* hardware */
        .set LAPIC_BASE,        0xfee00000
        .set IOAPIC_BASE,       0xfec00000
        .set COM1,              0x3f8
        .set PANIC_PORT,        0x501
        .set PROBE_PORT,        0x502
        .set MSR_EFER,          0xc0000080
        .set MSR_STAR,          0xc0000081
        .set MSR_LSTAR,         0xc0000082
        .set MSR_FMASK,         0xc0000084
        .set MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01
        .set VEC_TIMER,         0x20
        .set VEC_UART,          0x24
        .set VEC_SPURIOUS,      0xff
        .set UART_PIN,          4

        .text
        .globl kernel_entry
/* ================================================================ CPL0 */

kernel_entry:                           /* rdi = cpu, rsp = kernel stack top */
        mov     r15, rdi
        mov     rbx, rdi
        shl     rbx, PERCPU_SHIFT
        add     rbx, PERCPU_BASE
        mov     [rbx + K_CPU], r15
        test    r15, r15
        jnz     1f
        call    build_idt
        mov     qword ptr [SHARED + S_IDT_READY], 1
1:      cmp     qword ptr [SHARED + S_IDT_READY], 0
        je      1b
        lidt    [SHARED + S_IDTR]

        mov     rax, LAPIC_BASE
        mov     dword ptr [rax + 0xf0], 0x100 | VEC_SPURIOUS   /* SVR: enable */
        mov     dword ptr [rax + 0x80], 0                      /* TPR */
        test    r15, r15
        jnz     2f
        call    bsp_devices
        jmp     3f
2:      mov     dword ptr [rax + 0x3e0], 0xb                   /* divide by 1 */
        mov     rcx, [PARAMS + P_LAPIC_COUNT]
        mov     dword ptr [rax + 0x320], (1 << 17) | VEC_TIMER /* periodic */
        mov     dword ptr [rax + 0x380], ecx                   /* start */
3:      cmp     qword ptr [PARAMS + P_KVMCLOCK], 0
        je      4f
        lea     rax, [rbx + K_PVCLOCK + 1]                     /* bit 0: enable */
        mov     rdx, rax
        shr     rdx, 32
        mov     ecx, MSR_KVM_SYSTEM_TIME_NEW
        wrmsr
4:      mov     rdx, offset user_main
        cmp     qword ptr [PARAMS + P_PROBE_SYSCALL], 0
        je      5f
        call    setup_syscall
        mov     rdx, offset probe_user
5:      push    USER_DS                                        /* drop to CPL3 */
        lea     rax, [rbx + USTACK_TOP]
        push    rax
        push    0x3202                                         /* IF, IOPL=3 */
        push    USER_CS
        push    rdx
        mov     rdi, r15
        mov     rsi, rbx
        iretq

/*
 * The user-space probe: can this host's KVM run an ordinary OS's user
 * processes? They enter their kernel with `syscall`; if it arrives at
 * syscall_entry the probe says 1 on PROBE_PORT, if it faults the #PF/#GP
 * handler reports the fault on PANIC_PORT.
 */
setup_syscall:
        mov     ecx, MSR_EFER
        rdmsr
        or      eax, 1                  /* SCE */
        wrmsr
        mov     ecx, MSR_STAR
        xor     eax, eax
        mov     edx, KERNEL_CS | ((USER_DS - 8) << 16)
        wrmsr
        mov     ecx, MSR_LSTAR
        mov     rax, offset syscall_entry
        mov     rdx, rax
        shr     rdx, 32
        wrmsr
        mov     ecx, MSR_FMASK
        mov     eax, 0x200
        xor     edx, edx
        wrmsr
        ret

syscall_entry:                          /* CPL0 if the host delivered the syscall */
        mov     al, 1
        mov     dx, PROBE_PORT
        out     dx, al
1:      hlt
        jmp     1b

probe_user:
        syscall
        jmp     probe_user

/* Fill the IDT from vector_table (vector, handler, attributes). */
build_idt:
        mov     rsi, offset vector_table
1:      mov     rax, [rsi]
        cmp     rax, -1
        je      2f
        mov     rdx, [rsi + 8]
        mov     rcx, [rsi + 16]
        shl     rax, 4
        add     rax, IDT_BASE
        mov     r8, rdx
        and     r8, 0xffff
        or      r8, KERNEL_CS << 16
        shl     rcx, 40
        or      r8, rcx
        mov     r9, rdx
        shr     r9, 16
        and     r9, 0xffff
        shl     r9, 48
        or      r8, r9
        mov     [rax], r8
        mov     r9, rdx
        shr     r9, 32
        mov     [rax + 8], r9
        add     rsi, 24
        jmp     1b
2:      mov     word ptr [SHARED + S_IDTR], 0xfff
        mov     qword ptr [SHARED + S_IDTR + 2], IDT_BASE
        ret

/* CPU 0 owns the legacy devices: PIC (masked), IOAPIC routes, PIT, UART. */
bsp_devices:
        mov     al, 0x11                /* PIC ICW1..4, then mask everything */
        out     0x20, al
        out     0xa0, al
        mov     al, 0x30
        out     0x21, al
        mov     al, 0x38
        out     0xa1, al
        mov     al, 4
        out     0x21, al
        mov     al, 2
        out     0xa1, al
        mov     al, 1
        out     0x21, al
        out     0xa1, al
        mov     al, 0xff
        out     0x21, al
        out     0xa1, al

        mov     rax, IOAPIC_BASE        /* IOAPIC: PIT pin and UART pin to CPU 0 */
        mov     rcx, [PARAMS + P_TIMER_PIN]
        lea     edx, [rcx * 2 + 0x10]
        mov     dword ptr [rax], edx
        mov     dword ptr [rax + 0x10], VEC_TIMER
        inc     edx
        mov     dword ptr [rax], edx
        mov     dword ptr [rax + 0x10], 0
        mov     dword ptr [rax], 0x10 + 2 * UART_PIN
        mov     dword ptr [rax + 0x10], VEC_UART
        mov     dword ptr [rax], 0x11 + 2 * UART_PIN
        mov     dword ptr [rax + 0x10], 0

        mov     al, 0x34                /* PIT channel 0: rate generator */
        out     0x43, al
        mov     rax, [PARAMS + P_PIT_DIVISOR]
        out     0x40, al
        mov     al, ah
        out     0x40, al

        mov     dx, COM1 + 3            /* UART: 8N1, FIFOs, OUT2, RX interrupt */
        mov     al, 0x03
        out     dx, al
        mov     dx, COM1 + 2
        mov     al, 0x07
        out     dx, al
        mov     dx, COM1 + 4
        mov     al, 0x0b
        out     dx, al
        mov     dx, COM1 + 1
        mov     al, 0x01
        out     dx, al
        ret

/* ---- interrupt handlers ---- */

timer_isr:
        push    rax
        mov     rax, rsp
        and     rax, -KSTACK_TOP        /* the per-CPU block holds this stack */
        inc     qword ptr [rax + K_TICKS]
        mov     rax, LAPIC_BASE + 0xb0
        mov     dword ptr [rax], 0      /* EOI */
        pop     rax
        iretq

uart_isr:
        push    rax
        push    rcx
        push    rdx
1:      mov     dx, COM1 + 5
        in      al, dx
        test    al, 1
        jz      2f
        mov     dx, COM1
        in      al, dx
        mov     rcx, [SHARED + S_RX_HEAD]
        mov     rdx, rcx
        and     rdx, 0xff
        mov     [rdx + SHARED + S_RX_RING], al
        inc     rcx
        mov     [SHARED + S_RX_HEAD], rcx
        jmp     1b
2:      mov     rax, LAPIC_BASE + 0xb0
        mov     dword ptr [rax], 0
        pop     rdx
        pop     rcx
        pop     rax
        iretq

/*
 * #GP. `hlt` at CPL3 is how the loop idles: it faults here, and we halt on its
 * behalf until the next interrupt, then step over it. (A software interrupt
 * would be the textbook way, but some hosts cannot deliver `int n` from CPL3;
 * every host delivers exceptions.) Any other #GP is a real fault.
 */
gp_isr:                                 /* [rsp]=err [rsp+8]=rip [rsp+16]=cs */
        test    qword ptr [rsp + 16], 3
        jz      1f
        push    rax
        mov     rax, [rsp + 16]
        cmp     byte ptr [rax], 0xf4
        pop     rax
        jne     1f
        sti
        hlt
        cli
        add     qword ptr [rsp + 8], 1
        add     rsp, 8                  /* drop the error code */
        iretq
1:      push    13
        jmp     fault_common

spurious_isr:
        iretq

/* Exception stubs push (error code, vector) and join fault_common. */
        .macro  EXC_NOERR vec
exc_\vec:
        push    0
        push    \vec
        jmp     fault_common
        .endm
        .macro  EXC_ERR vec
exc_\vec:
        push    \vec
        jmp     fault_common
        .endm
        .irp    v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
        EXC_NOERR \v
        .endr
        .irp    v, 8,10,11,12,14,17,21,29,30
        EXC_ERR \v
        .endr

fault_common:                           /* [rsp]=vec [rsp+8]=err [rsp+16]=rip */
        mov     rsi, offset s_fault_vec
        call    puts
        mov     rax, [rsp]
        call    print_hex
        mov     rsi, offset s_err
        call    puts
        mov     rax, [rsp + 8]
        call    print_hex
        mov     rsi, offset s_rip
        call    puts
        mov     rax, [rsp + 16]
        call    print_hex
        mov     rsi, offset s_cr2
        call    puts
        mov     rax, cr2
        call    print_hex
        mov     al, 10
        call    putc
        mov     rax, [rsp]
        mov     dx, PANIC_PORT
        out     dx, al                  /* tell the VMM the guest is dead */
1:      cli
        hlt
        jmp     1b

/* ================================================================ CPL3 */

user_main:                              /* rdi = cpu, rsi = per-CPU block */
        mov     r15, rdi
        mov     rbx, rsi
        mov     rax, [PARAMS + P_WS_PAGES]
        mov     [rbx + U_SLICE_PAGES], rax
        imul    rax, r15
        shl     rax, 12
        add     rax, [PARAMS + P_WS_BASE]
        mov     [rbx + U_SLICE_BASE], rax
        mov     qword ptr [rbx + U_GEN], 1
        mov     rax, [rbx + K_TICKS]
        mov     [rbx + U_LAST_TICKS], rax
        add     rax, [PARAMS + P_HB_TICKS]
        mov     [rbx + U_NEXT_HB], rax
        call    lock_serial
        mov     rsi, offset s_start
        call    puts
        mov     rax, r15
        call    print_dec
        mov     rsi, offset s_pages
        call    puts
        mov     rax, [rbx + U_SLICE_PAGES]
        call    print_dec
        mov     al, 10
        call    putc
        call    unlock_serial

main_loop:
        mov     rax, [rbx + K_TICKS]
        mov     rcx, rax
        sub     rcx, [rbx + U_LAST_TICKS]
        jnz     1f
        hlt                             /* nothing due: sleep until an interrupt (see gp_isr) */
        jmp     main_loop
1:      mov     [rbx + U_LAST_TICKS], rax
        cmp     rcx, 2                  /* catch up at most two ticks */
        jbe     2f
        mov     rcx, 2
2:      mov     r12, rcx
        mov     rax, [PARAMS + P_WRITE_FP]
        imul    rax, r12
        add     [rbx + U_CREDIT], rax
3:      cmp     qword ptr [rbx + U_CREDIT], 0x10000
        jb      4f
        sub     qword ptr [rbx + U_CREDIT], 0x10000
        call    write_next_page
        jmp     3b
4:      mov     r13, [PARAMS + P_VERIFY_PER_TICK]
        imul    r13, r12
5:      test    r13, r13
        jz      6f
        call    verify_next_page
        dec     r13
        jmp     5b
6:      mov     rax, [rbx + U_LAST_TICKS]
        cmp     rax, [rbx + U_NEXT_HB]
        jb      7f
        add     rax, [PARAMS + P_HB_TICKS]
        mov     [rbx + U_NEXT_HB], rax
        call    heartbeat
7:      test    r15, r15
        jnz     main_loop
        call    echo_rx
        jmp     main_loop

/* rdx = the next value of the splitmix64 stream whose state is r9 (clobbers rsi). */
        .macro  SPLITMIX
        add     r9, [k_golden]
        mov     rdx, r9
        mov     rsi, rdx
        shr     rsi, 30
        xor     rdx, rsi
        imul    rdx, [k_mix1]
        mov     rsi, rdx
        shr     rsi, 27
        xor     rdx, rsi
        imul    rdx, [k_mix2]
        mov     rsi, rdx
        shr     rsi, 31
        xor     rdx, rsi
        .endm

/* Page i of this CPU's slice: rdi = its address, rdx = its global page number. */
        .macro  PAGE_ADDR idx
        mov     rdi, \idx
        shl     rdi, 12
        add     rdi, [rbx + U_SLICE_BASE]
        mov     rdx, rdi
        shr     rdx, 12
        .endm

/* fill_page: rdi = page, rax = its seed v (0: an all-zero page). Clobbers rcx, rdx, rsi, r9. */
fill_page:
        test    rax, rax
        jnz     1f
        mov     ecx, 512
        rep     stosq
        ret
1:      mov     r9, rax
        mov     ecx, 256
2:      SPLITMIX
        mov     [rdi], rdx
        add     rdi, 8
        dec     ecx
        jnz     2b
        mov     ecx, 256
        rep     stosq
        ret

/*
 * check_page: rdi = page, rax = its seed v. Returns rcx = 0 when the page
 * holds what it must; otherwise rdi points just past the first wrong qword,
 * r11 = the value expected there and r9 = the value found. Clobbers rdx, rsi.
 */
check_page:
        test    rax, rax
        jnz     1f
        mov     r11, rax
        jmp     3f
1:      mov     r9, rax
        mov     ecx, 256
2:      SPLITMIX
        add     rdi, 8
        cmp     [rdi - 8], rdx
        jne     4f
        dec     ecx
        jnz     2b
        mov     r11, rax
        mov     ecx, 256
        repe    scasq
        jne     5f
        xor     ecx, ecx
        ret
3:      mov     ecx, 512
        repe    scasq
        jne     5f
        xor     ecx, ecx
        ret
4:      mov     r11, rdx
        mov     r9, [rdi - 8]
        mov     ecx, 1
        ret
5:      mov     r9, [rdi - 8]
        mov     ecx, 1
        ret

write_next_page:
        cmp     qword ptr [rbx + U_SLICE_PAGES], 0
        je      9f
        cmp     qword ptr [PARAMS + P_FILL_ONCE], 0
        je      2f
        cmp     qword ptr [rbx + U_GEN], 1      /* generation 2: every page written once */
        ja      9f
2:
        mov     r8, [rbx + U_CURSOR]
        PAGE_ADDR r8
        mov     rax, [rbx + U_GEN]
        shl     rax, 32
        or      rax, rdx
        call    fill_page
        inc     qword ptr [rbx + U_WRITES]
        inc     r8
        cmp     r8, [rbx + U_SLICE_PAGES]
        jb      1f
        xor     r8d, r8d
        inc     qword ptr [rbx + U_GEN]
1:      mov     [rbx + U_CURSOR], r8
9:      ret

/* rax = the value page r8 must hold (rdi/rdx set by PAGE_ADDR r8). */
expected_value:
        mov     rax, [rbx + U_GEN]
        cmp     r8, [rbx + U_CURSOR]
        jb      1f
        dec     rax
1:      test    rax, rax
        jz      2f
        shl     rax, 32
        or      rax, rdx
2:      ret

verify_next_page:
        cmp     qword ptr [rbx + U_SLICE_PAGES], 0
        je      9f
        mov     r8, [rbx + U_VCURSOR]
        PAGE_ADDR r8
        call    expected_value
        mov     r10, rdi
        push    rax
        call    check_page
        pop     rax
        test    ecx, ecx
        jnz     corrupt
        inc     qword ptr [rbx + U_VERIFIED]
next_vcursor:
        inc     r8
        cmp     r8, [rbx + U_SLICE_PAGES]
        jb      1f
        xor     r8d, r8d
1:      mov     [rbx + U_VCURSOR], r8
9:      ret

corrupt:                        /* r10 = page, rax = seed, r11 = expected, r9 = found */
        push    rax
        sub     rdi, 8
        push    rdi
        inc     qword ptr [rbx + U_ERRORS]
        call    lock_serial
        mov     rsi, offset s_corrupt
        call    puts
        mov     rax, r15
        call    print_dec
        mov     rsi, offset s_page
        call    puts
        mov     rax, r10
        call    print_hex
        mov     rsi, offset s_off
        call    puts
        pop     rax
        sub     rax, r10
        call    print_hex
        mov     rsi, offset s_expected
        call    puts
        mov     rax, r11
        call    print_hex
        mov     rsi, offset s_found
        call    puts
        mov     rax, r9
        call    print_hex
        mov     al, 10
        call    putc
        call    unlock_serial
        mov     rdi, r10                /* repair it, so each loss is told once */
        pop     rax
        call    fill_page
        jmp     next_vcursor

heartbeat:
        inc     qword ptr [rbx + U_HB]
        xor     r14d, r14d              /* r14 = kvmclock ns, 0 if disabled */
        cmp     qword ptr [PARAMS + P_KVMCLOCK], 0
        je      1f
        call    kvmclock_ns
        mov     r14, rax
        cmp     rax, [rbx + U_LAST_NS]
        jae     1f
        inc     qword ptr [rbx + U_ERRORS]
        call    lock_serial
        mov     rsi, offset s_clock
        call    puts
        mov     rax, r15
        call    print_dec
        mov     rsi, offset s_backwards
        call    puts
        mov     rax, [rbx + U_LAST_NS]
        call    print_dec
        mov     rsi, offset s_to
        call    puts
        mov     rax, r14
        call    print_dec
        mov     al, 10
        call    putc
        call    unlock_serial
1:      mov     [rbx + U_LAST_NS], r14
        call    lock_serial
        mov     rsi, offset s_hb
        call    puts
        mov     rax, r15
        call    print_dec
        mov     rsi, offset s_n
        call    puts
        mov     rax, [rbx + U_HB]
        call    print_dec
        mov     rsi, offset s_ticks
        call    puts
        mov     rax, [rbx + U_LAST_TICKS]
        call    print_dec
        mov     rsi, offset s_w
        call    puts
        mov     rax, [rbx + U_WRITES]
        call    print_dec
        mov     rsi, offset s_v
        call    puts
        mov     rax, [rbx + U_VERIFIED]
        call    print_dec
        mov     rsi, offset s_errs
        call    puts
        mov     rax, [rbx + U_ERRORS]
        call    print_dec
        mov     rsi, offset s_ns
        call    puts
        mov     rax, r14
        call    print_dec
        cmp     qword ptr [PARAMS + P_USE_RTC], 0
        je      2f
        mov     rsi, offset s_rtc
        call    puts
        mov     ah, 4                   /* hours, minutes, seconds (BCD) */
        call    print_rtc
        mov     al, ':'
        call    putc
        mov     ah, 2
        call    print_rtc
        mov     al, ':'
        call    putc
        mov     ah, 0
        call    print_rtc
2:      mov     al, 10
        call    putc
        call    unlock_serial
        ret

/* print_rtc: the RTC register ah as two BCD digits (the lock is held). */
print_rtc:
        push    rdx
        mov     al, ah
        out     0x70, al
        in      al, 0x71
        mov     dl, al
        shr     al, 4
        add     al, '0'
        call    putc
        mov     al, dl
        and     al, 0x0f
        add     al, '0'
        call    putc
        pop     rdx
        ret

/* kvmclock: ns = system_time + ((tsc - tsc_timestamp) << shift) * mul >> 32 */
kvmclock_ns:
1:      mov     r9d, [rbx + K_PVCLOCK]
        test    r9d, 1
        jnz     1b
        lfence
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        sub     rax, [rbx + K_PVCLOCK + 8]
        movsx   ecx, byte ptr [rbx + K_PVCLOCK + 28]
        test    ecx, ecx
        js      2f
        shl     rax, cl
        jmp     3f
2:      neg     ecx
        shr     rax, cl
3:      mov     r10d, [rbx + K_PVCLOCK + 24]
        mul     r10
        shrd    rax, rdx, 32
        add     rax, [rbx + K_PVCLOCK + 16]
        cmp     r9d, [rbx + K_PVCLOCK]
        jne     1b
        ret

/* CPU 0: turn complete received lines into "ECHO <line>". */
echo_rx:
1:      mov     rax, [SHARED + S_RX_TAIL]
        cmp     rax, [SHARED + S_RX_HEAD]
        je      9f
        mov     rdx, rax
        and     rdx, 0xff
        movzx   ecx, byte ptr [rdx + SHARED + S_RX_RING]
        inc     rax
        mov     [SHARED + S_RX_TAIL], rax
        cmp     cl, 10
        je      2f
        cmp     cl, 13
        je      2f
        mov     rdx, [SHARED + S_LINE_LEN]
        mov     [rdx + SHARED + S_LINE], cl
        inc     rdx
        mov     [SHARED + S_LINE_LEN], rdx
        cmp     rdx, 120
        jb      1b
2:      cmp     qword ptr [SHARED + S_LINE_LEN], 0
        je      1b
        call    lock_serial
        mov     rsi, offset s_echo
        call    puts
        xor     r8d, r8d
3:      cmp     r8, [SHARED + S_LINE_LEN]
        jae     4f
        mov     al, [r8 + SHARED + S_LINE]
        call    putc
        inc     r8
        jmp     3b
4:      mov     al, 10
        call    putc
        call    unlock_serial
        mov     qword ptr [SHARED + S_LINE_LEN], 0
        jmp     1b
9:      ret

/* ---- serial output (usable at CPL0 and CPL3) ---- */

lock_serial:
1:      mov     eax, 1
        xchg    eax, [SHARED + S_LOCK]
        test    eax, eax
        jz      2f
        pause
        jmp     1b
2:      ret

unlock_serial:
        mov     dword ptr [SHARED + S_LOCK], 0
        ret

putc:                                   /* al */
        push    rdx
        mov     dx, COM1
        out     dx, al
        pop     rdx
        ret

puts:                                   /* rsi = NUL-terminated string */
1:      mov     al, [rsi]
        test    al, al
        jz      2f
        call    putc
        inc     rsi
        jmp     1b
2:      ret

print_dec:                              /* rax, unsigned */
        push    rdx
        push    rcx
        push    rdi
        lea     rdi, [rsp - 1]          /* digits go below the stack pointer */
        sub     rsp, 32
        mov     byte ptr [rdi], 0
        mov     ecx, 10
1:      xor     edx, edx
        div     rcx
        add     dl, '0'
        dec     rdi
        mov     [rdi], dl
        test    rax, rax
        jnz     1b
        mov     rsi, rdi
        call    puts
        add     rsp, 32
        pop     rdi
        pop     rcx
        pop     rdx
        ret

print_hex:                              /* rax, as 0x... */
        push    rcx
        push    rdx
        mov     rdx, rax
        mov     al, '0'
        call    putc
        mov     al, 'x'
        call    putc
        mov     ecx, 60
1:      mov     rax, rdx                /* skip leading zeros, keep the last digit */
        shr     rax, cl
        test    rax, rax
        jnz     2f
        sub     ecx, 4
        jnz     1b
2:      mov     rax, rdx
        shr     rax, cl
        and     eax, 0xf
        cmp     al, 10
        jb      3f
        add     al, 'a' - 10 - '0'
3:      add     al, '0'
        call    putc
        sub     ecx, 4
        jns     2b
        pop     rdx
        pop     rcx
        ret

/* ================================================================ data */

        .section .rodata
        .balign 8
k_golden:       .quad   0x9e3779b97f4a7c15
k_mix1:         .quad   0xbf58476d1ce4e5b9
k_mix2:         .quad   0x94d049bb133111eb
vector_table:                           /* vector, handler, gate attributes */
        .irp    v, 0,1,2,3,4,5,6,7,8,9,10,11,12,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad   \v, exc_\v, 0x8e
        .endr
        .quad   13, gp_isr, 0x8e
        .quad   VEC_TIMER, timer_isr, 0x8e
        .quad   VEC_UART, uart_isr, 0x8e
        .quad   VEC_SPURIOUS, spurious_isr, 0x8e
        .quad   -1

s_start:        .asciz "START cpu="
s_pages:        .asciz " pages="
s_hb:           .asciz "HB cpu="
s_n:            .asciz " n="
s_ticks:        .asciz " ticks="
s_w:            .asciz " w="
s_v:            .asciz " v="
s_errs:         .asciz " err="
s_ns:           .asciz " ns="
s_rtc:          .asciz " rtc="
s_corrupt:      .asciz "CORRUPT cpu="
s_page:         .asciz " page="
s_off:          .asciz " off="
s_expected:     .asciz " expected="
s_found:        .asciz " found="
s_clock:        .asciz "CLOCK cpu="
s_backwards:    .asciz " backwards from "
s_to:           .asciz " to "
s_echo:         .asciz "ECHO "
s_fault_vec:    .asciz "\nFAULT vec="
s_err:          .asciz " err="
s_rip:          .asciz " rip="
s_cr2:          .asciz " cr2="
