// Per-label statistics of a label volume in one pass (pdacscreen.kernels.components, CuPy path).
//
// labels: (z, y, x) int32, C order, 0 = background, 1..n_labels = components.
// For each label l: count[l], sums[3l+c] (sum of index along axis c, exact integers),
// lo[3l+c] / hi[3l+c] (inclusive index bounds).  The caller zero-fills count and sums, fills lo
// with INT_MAX and hi with -1.  Grid-stride loop: any launch configuration is correct.
extern "C" __global__ void pdacscreen_component_stats(
    const int* __restrict__ labels,
    const long long n,
    const int ny,
    const int nx,
    unsigned long long* __restrict__ count,
    unsigned long long* __restrict__ sums,
    int* __restrict__ lo,
    int* __restrict__ hi)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
        const int l = labels[idx];
        if (l <= 0) {
            continue;
        }
        const int i = (int)(idx % nx);
        const long long r = idx / nx;
        const int j = (int)(r % ny);
        const int k = (int)(r / ny);
        atomicAdd(&count[l], 1ULL);
        atomicAdd(&sums[3 * l + 0], (unsigned long long)k);
        atomicAdd(&sums[3 * l + 1], (unsigned long long)j);
        atomicAdd(&sums[3 * l + 2], (unsigned long long)i);
        atomicMin(&lo[3 * l + 0], k);
        atomicMin(&lo[3 * l + 1], j);
        atomicMin(&lo[3 * l + 2], i);
        atomicMax(&hi[3 * l + 0], k);
        atomicMax(&hi[3 * l + 1], j);
        atomicMax(&hi[3 * l + 2], i);
    }
}
