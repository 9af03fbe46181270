/* The arithmetic floor of the exact meta-test sweep on this CPU: Adam's per-parameter maths alone.

   Build and run (the figure bench_meta_eval.py's measurements are compared with):
       gcc -O3 -march=native -fno-math-errno -fopenmp benchmarks/adam_floor.c -o /tmp/adam_floor -lm
       OMP_NUM_THREADS=2 /tmp/adam_floor

   Each thread updates its own block of weights, moments and gradients small enough to stay in
   its L1/L2 cache, over and over, with torch.optim.Adam's operations in its order (lerp of m,
   v*b2 + (1-b2) g^2, sqrt(v)/sqrt(bc2) + eps, p -= step * m / denom): IEEE sqrt and division,
   no memory traffic at all. The frozen ANML sweep is 9,000 steps x 120 trajectories x 1000 x 2305
   = 2.49e12 such updates, so this figure times 2.49e12 is a lower bound for any exact
   implementation on this machine, however its memory traffic is arranged.
*/
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define BLOCK 4096
#define REPEATS 100000
#define FULL_SWEEP_UPDATES 2.48940e12

/* One Adam step of n parameters, with torch.optim.Adam's operations in its order. */
__attribute__((noinline)) static void adam_step(float *restrict p, float *restrict m, float *restrict v,
                                                const float *restrict g, float step, float bc2_sqrt, int n) {
    const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    for (int i = 0; i < n; i++) {
        const float mi = m[i] + (1.0f - b1) * (g[i] - m[i]);
        const float vi = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        m[i] = mi;
        v[i] = vi;
        p[i] -= step * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

/* REPEATS Adam steps of one cache-resident block; returns the sum of the weights (keeps the work). */
static double adam_block(float *p, float *m, float *v, const float *g) {
    for (long t = 1; t <= REPEATS; t++)
        adam_step(p, m, v, g, 1e-3f / (1.0f - powf(0.9f, (float)t)), sqrtf(1.0f - powf(0.999f, (float)t)), BLOCK);
    double sum = 0.0;
    for (int i = 0; i < BLOCK; i++) sum += p[i];
    return sum;
}

int main(void) {
    int threads = omp_get_max_threads();
    double checksum = 0.0, start = omp_get_wtime();
#pragma omp parallel reduction(+ : checksum)
    {
        float *block = aligned_alloc(64, 4 * BLOCK * sizeof(float));
        for (int i = 0; i < BLOCK; i++) {
            block[i] = 0.01f * i; block[BLOCK + i] = block[2 * BLOCK + i] = 0.0f;
            block[3 * BLOCK + i] = 1e-3f * (i % 17 - 8);
        }
        checksum += adam_block(block, block + BLOCK, block + 2 * BLOCK, block + 3 * BLOCK);
        free(block);
    }
    double elapsed = omp_get_wtime() - start;
    double ns = elapsed / ((double)REPEATS * BLOCK * threads) * 1e9;  /* wall time per update */
    printf("exact Adam arithmetic, cache-resident, %d threads: %.3f ns per parameter update (wall)\n",
           threads, ns);
    printf("  => lower bound for the full frozen 600-class sweep (2.49e12 updates): %.0f s = %.1f min"
           " (checksum %.3g)\n", ns * FULL_SWEEP_UPDATES / 1e9, ns * FULL_SWEEP_UPDATES / 1e9 / 60, checksum);
    return 0;
}
