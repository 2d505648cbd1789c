/*
 * vmigrate guest workload: the Linux twin of the built-in test guest.
 *
 * Allocates a working set, rewrites it page by page at a fixed dirty rate in
 * round-robin order and keeps re-verifying every page, so that a migration
 * that loses or mixes up memory is seen by the guest itself.
 *
 * Page p after w page writes in total holds generation
 *     g(p) = w / npages + (p < w % npages)
 * (generation 0 is the initial fill), and every 64-bit word of the page holds
 * page_value(p, g(p)). Nothing else is stored: one counter is the whole state.
 *
 * Parameters are key=value arguments (a "vmigrate." prefix is accepted, so
 * /init can pass kernel command-line words through unchanged). Sizes take a
 * K/M/G suffix (powers of 1024):
 *   ws=SIZE       working set (default 64M; 0 = heartbeats only)
 *   rate=SIZE     bytes rewritten per second (default 0 = idle)
 *   verify=SIZE   bytes verified per second (default 256M; 0 = as fast as possible)
 *   duration=S    exit after S seconds (default 0 = run forever)
 *   corrupt=S     debug: after S seconds flip one byte of one page, once
 *   corrupt_page=N  the page the debug flip hits (default: the middle one)
 *
 * Console output (one line each):
 *   HB n=<heartbeat> w=<pages written> errors=<n> passes=<full verify passes>
 *   CORRUPT page=<n> expected=<x> found=<y> word=<i>
 * A corrupted page is reported once, then rewritten with its expected value.
 * Exit status: 0 = no errors, 1 = corruption seen, 2 = bad arguments/allocation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE_SIZE 4096u
#define PAGE_WORDS (PAGE_SIZE / sizeof(uint64_t))
#define BATCH 256           /* pages written or verified between clock checks */
#define MAX_CORRUPT_LINES 64 /* CORRUPT lines per second, the rest only counted */

typedef unsigned long long ull;

static uint64_t *mem;
static uint64_t npages;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* splitmix64 of (page, generation): differs per page and per generation. */
static uint64_t page_value(uint64_t page, uint64_t gen)
{
    uint64_t z = page * 0x9E3779B97F4A7C15ull + gen * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill_page(uint64_t page, uint64_t gen)
{
    uint64_t v = page_value(page, gen), *p = mem + page * PAGE_WORDS;
    for (unsigned i = 0; i < PAGE_WORDS; i++)
        p[i] = v;
}

static uint64_t expected_gen(uint64_t page, uint64_t written)
{
    return written / npages + (page < written % npages ? 1 : 0);
}

/* Returns the index of the first wrong word, or -1 if the page is intact. */
static int check_page(uint64_t page, uint64_t v)
{
    const uint64_t *p = mem + page * PAGE_WORDS;
    for (unsigned i = 0; i < PAGE_WORDS; i++)
        if (p[i] != v)
            return (int)i;
    return -1;
}

static int parse_size(const char *s, ull *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0)
        return -1;
    switch (*end) {
    case 'k': case 'K': v *= 1024.0; end++; break;
    case 'm': case 'M': v *= 1024.0 * 1024; end++; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024; end++; break;
    case 't': case 'T': v *= 1024.0 * 1024 * 1024 * 1024; end++; break;
    }
    if (*end == 'i')
        end++;
    if (*end == 'B' || *end == 'b')
        end++;
    if (*end != '\0')
        return -1;
    *out = (ull)v;
    return 0;
}

int main(int argc, char **argv)
{
    ull ws = 64ull << 20, rate = 0, verify = 256ull << 20, duration = 0;
    ull corrupt_after = 0, corrupt_page = ~0ull;
    int corrupt_armed = 0;

    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "vmigrate.", 9) == 0)
            arg += 9;
        const char *eq = strchr(arg, '=');
        ull val;
        if (!eq || parse_size(eq + 1, &val) != 0) {
            fprintf(stderr, "workload: bad argument '%s' (expected key=size)\n", argv[i]);
            return 2;
        }
        size_t klen = (size_t)(eq - arg);
#define KEY(name) (klen == strlen(name) && strncmp(arg, name, klen) == 0)
        if (KEY("ws")) ws = val;
        else if (KEY("rate")) rate = val;
        else if (KEY("verify")) verify = val;
        else if (KEY("duration")) duration = val;
        else if (KEY("corrupt")) { corrupt_after = val; corrupt_armed = 1; }
        else if (KEY("corrupt_page")) corrupt_page = val;
        else {
            fprintf(stderr, "workload: unknown parameter '%s'\n", argv[i]);
            return 2;
        }
#undef KEY
    }

    npages = ws / PAGE_SIZE;
    if (npages) {
        mem = mmap(NULL, npages * PAGE_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            fprintf(stderr, "workload: cannot allocate %llu bytes: %s\n", ws, strerror(errno));
            return 2;
        }
    }
    if (corrupt_page == ~0ull)
        corrupt_page = npages / 2;
    if (corrupt_armed && corrupt_page >= npages) {
        fprintf(stderr, "workload: corrupt_page=%llu outside the %llu-page working set\n",
                corrupt_page, (ull)npages);
        return 2;
    }

    double t_fill = now_s();
    for (uint64_t p = 0; p < npages; p++)
        fill_page(p, 0);
    double start = now_s();
    printf("WL ready pages=%llu rate=%llu verify=%llu fill_ms=%.0f\n",
           (ull)npages, rate, verify, (start - t_fill) * 1e3);

    const double write_pps = (double)rate / PAGE_SIZE, verify_pps = (double)verify / PAGE_SIZE;
    /* Credits accumulate with time; capping them stops a burst after a stall. */
    const double write_cap = write_pps * 0.1 + BATCH, verify_cap = verify_pps * 0.1 + BATCH;
    double write_credit = 0, verify_credit = 0, last = start, next_hb = start + 1.0;
    uint64_t written = 0, cursor = 0, passes = 0, errors = 0, hb = 0, lines_this_sec = 0;

    for (;;) {
        double now = now_s(), dt = now - last;
        last = now;
        write_credit = write_credit + dt * write_pps;
        if (write_credit > write_cap)
            write_credit = write_cap;
        verify_credit = verify == 0 ? BATCH : verify_credit + dt * verify_pps;
        if (verify_credit > verify_cap)
            verify_credit = verify_cap;

        if (npages) {
            for (int n = 0; n < BATCH && write_credit >= 1.0; n++, write_credit -= 1.0) {
                fill_page(written % npages, written / npages + 1);
                written++;
            }
            for (int n = 0; n < BATCH && verify_credit >= 1.0; n++, verify_credit -= 1.0) {
                uint64_t want = page_value(cursor, expected_gen(cursor, written));
                int word = check_page(cursor, want);
                if (word >= 0) {
                    errors++;
                    if (lines_this_sec++ < MAX_CORRUPT_LINES)
                        printf("CORRUPT page=%llu expected=%016llx found=%016llx word=%d\n",
                               (ull)cursor, (ull)want,
                               (ull)mem[cursor * PAGE_WORDS + (unsigned)word], word);
                    fill_page(cursor, expected_gen(cursor, written));
                }
                if (++cursor == npages) {
                    cursor = 0;
                    passes++;
                }
            }
            if (corrupt_armed && now - start >= (double)corrupt_after) {
                corrupt_armed = 0;
                ((volatile unsigned char *)mem)[corrupt_page * PAGE_SIZE + 123] ^= 0x5a;
                printf("WL debug: flipped a byte of page %llu\n", corrupt_page);
            }
        }

        if (now >= next_hb) {
            printf("HB n=%llu w=%llu errors=%llu passes=%llu\n",
                   (ull)++hb, (ull)written, (ull)errors, (ull)passes);
            next_hb = now > next_hb + 1.0 ? now + 1.0 : next_hb + 1.0;
            lines_this_sec = 0;
        }
        if (duration && now - start >= (double)duration) {
            printf("WL done w=%llu errors=%llu passes=%llu\n",
                   (ull)written, (ull)errors, (ull)passes);
            return errors ? 1 : 0;
        }

        /* Nothing due: sleep until the next page is due, 1 to 10 ms (fewer wake-ups). */
        if (write_credit < 1.0 && (!npages || (verify != 0 && verify_credit < 1.0))) {
            double wait = next_hb - now;
            if (write_pps > 0 && (1.0 - write_credit) / write_pps < wait)
                wait = (1.0 - write_credit) / write_pps;
            if (npages && verify_pps > 0 && (1.0 - verify_credit) / verify_pps < wait)
                wait = (1.0 - verify_credit) / verify_pps;
            if (wait > 0.01)
                wait = 0.01;
            if (wait < 0.001)
                wait = 0.001;
            struct timespec ts = {0, (long)(wait * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
}
