// Instantiates every CUDA kernel template for every dtype, so `nvcc -c` on this file (see
// test_nvcc_compile.py) catches compile errors in csrc/include/distillx/cuda/*.cuh on machines
// without a GPU or a CUDA build of torch.
#include "distillx/cuda/logit_divergence.cuh"

namespace dc = distillx::cuda;
template void dc::launch_logit_divergence<float, float>(const float*, const float*, const float*, float*, float*,
                                                        int64_t, int64_t, float, float, int, cudaStream_t);
template void dc::launch_logit_divergence<double, double>(const double*, const double*, const double*, double*,
                                                          double*, int64_t, int64_t, double, double, int, cudaStream_t);
template void dc::launch_logit_divergence<__half, float>(const __half*, const __half*, const float*, float*, __half*,
                                                         int64_t, int64_t, float, float, int, cudaStream_t);
template void dc::launch_logit_divergence<__nv_bfloat16, float>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                                const float*, float*, __nv_bfloat16*, int64_t, int64_t,
                                                                float, float, int, cudaStream_t);

#include "distillx/cuda/attention_map.cuh"
#include "distillx/cuda/kernel_gram.cuh"

template void dc::launch_attention_map<float>(const float*, float*, float*, float*, int64_t, int64_t, int64_t, float,
                                              cudaStream_t);
template void dc::launch_attention_map<double>(const double*, double*, double*, double*, int64_t, int64_t, int64_t,
                                               double, cudaStream_t);
template void dc::launch_attention_map_backward<float>(const float*, const float*, const float*, float*, int64_t,
                                                       int64_t, int64_t, float, cudaStream_t);
template void dc::launch_attention_map_backward<double>(const double*, const double*, const double*, double*, int64_t,
                                                        int64_t, int64_t, double, cudaStream_t);
template void dc::launch_gram_panel<float>(const dc::PanelPointers<float>&, int, dc::SideParams<float>,
                                           dc::SideParams<float>, int64_t, int64_t, int64_t, int, bool, double*,
                                           cudaStream_t);
template void dc::launch_gram_panel<double>(const dc::PanelPointers<double>&, int, dc::SideParams<double>,
                                            dc::SideParams<double>, int64_t, int64_t, int64_t, int, bool, double*,
                                            cudaStream_t);

#include "distillx/cuda/attention_relation.cuh"

template void dc::launch_relation_update<float>(const float*, const float*, const dc::RelationTile&, float*,
                                                cudaStream_t);
template void dc::launch_relation_update<double>(const double*, const double*, const dc::RelationTile&, double*,
                                                 cudaStream_t);
template void dc::launch_relation_finish<float>(const float*, const dc::RelationTile&, float*, double*, cudaStream_t);
template void dc::launch_relation_finish<double>(const double*, const dc::RelationTile&, double*, double*,
                                                 cudaStream_t);
template void dc::launch_relation_grad<float>(float*, const float*, const dc::RelationTile&, const float*, float,
                                              cudaStream_t);
template void dc::launch_relation_grad<double>(double*, const double*, const dc::RelationTile&, const double*, double,
                                               cudaStream_t);
