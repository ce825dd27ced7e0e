/* Benchmark reader for scripts/bench.sh.
 *   reader ops PATH N THREADS   open+read+close PATH N times in each of THREADS threads;
 *                               prints "<median ns per op across threads> <total ops per second>"
 *   reader lat PATH SECONDS [PAUSE_US]
 *                               open+read+close in a loop for SECONDS (pausing PAUSE_US between
 *                               reads); prints
 *                               "<max us> <p99 us> <reads> <expired>" where a read is expired when
 *                               its "expires_on" (the .json view) is not in the future.
 * Never prints token bytes. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *path;
static long n_ops;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int read_once(char *buf, size_t cap) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t total = 0, r;
    while ((r = read(fd, buf + total, cap - 1 - total)) > 0) total += r;
    close(fd);
    buf[total] = 0;
    return r < 0 ? -1 : (int)total;
}

static void *ops(void *arg) {
    char buf[8192];
    long long t0 = now_ns();
    for (long i = 0; i < n_ops; i++)
        if (read_once(buf, sizeof buf) <= 0) { fprintf(stderr, "read failed\n"); exit(1); }
    *(long long *)arg = (now_ns() - t0) / n_ops;
    return NULL;
}

static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: reader ops PATH N THREADS | reader lat PATH SECONDS\n"); return 2; }
    path = argv[2];
    if (strcmp(argv[1], "ops") == 0) {
        n_ops = atol(argv[3]);
        int threads = argc > 4 ? atoi(argv[4]) : 1;
        pthread_t t[64];
        long long per[64];
        long long t0 = now_ns();
        for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, ops, &per[i]);
        for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
        double secs = (now_ns() - t0) / 1e9;
        qsort(per, threads, sizeof per[0], cmp);
        printf("%lld %.0f\n", per[threads / 2], threads * n_ops / secs);
        return 0;
    }
    long long end = now_ns() + atoll(argv[3]) * 1000000000LL;
    long pause_us = argc > 4 ? atol(argv[4]) : 0;
    size_t cap = 1 << 20, n = 0;
    long long *lat = malloc(cap * sizeof *lat);
    long expired = 0;
    char buf[8192];
    while (now_ns() < end && n < cap) {
        long long t0 = now_ns();
        if (read_once(buf, sizeof buf) <= 0) { fprintf(stderr, "read failed\n"); return 1; }
        lat[n++] = now_ns() - t0;
        char *e = strstr(buf, "\"expires_on\":");
        if (e && atoll(e + 13) <= (long long)time(NULL)) expired++;
        if (pause_us > 0) usleep(pause_us);
    }
    qsort(lat, n, sizeof *lat, cmp);
    printf("%lld %lld %zu %ld\n", lat[n - 1] / 1000, lat[n * 99 / 100] / 1000, n, expired);
    return 0;
}
