"""Kernels as plugins: the built-in kernels plugin, and a third-party kernel used by kfd and nst."""
from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import distillx as dx
import distillx.kernels
from distillx.distiller import Distiller
from distillx.ops.reference import kernel_matrix
from distillx.plugin import PluginLoadWarning, get_plugin_manager, get_registries, hookimpl

from distillx.testing import CNN, snapshot, unchanged

pytestmark = pytest.mark.filterwarnings("ignore:distillx::")

LAPLACIAN_PLUGIN = '''
import torch
from distillx.plugin import hookimpl


def laplacian(x, z):
    return torch.exp(-torch.cdist(x, z, p=1))


@hookimpl
def distillx_register_kernels(registry):
    registry.add("laplacian", laplacian)
'''


@pytest.fixture
def laplacian_plugin(tmp_path, monkeypatch):
    """An installed third-party distribution whose ``distillx`` entry point registers "laplacian"."""
    info = tmp_path / "distillx_laplace-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: distillx-laplace\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[distillx]\nlaplace = distillx_laplace_mod\n")
    (tmp_path / "distillx_laplace_mod.py").write_text(textwrap.dedent(LAPLACIAN_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    import sys
    sys.modules.pop("distillx_laplace_mod", None)


def laplacian(x, z):
    return torch.exp(-torch.cdist(x, z, p=1))


def test_builtin_kernels_are_a_builtin_plugin():
    pm = get_plugin_manager()
    assert pm.get_plugin("distillx.kernels").module == "distillx.kernels"
    assert pm.plugin_info["distillx.kernels"].source == "builtin"
    kernels = get_registries().kernels
    assert set(kernels.names()) >= {"linear", "polynomial", "rbf", "chebyshev", "cosine"}
    assert all(kernels.provider(n) == "distillx.kernels" for n in distillx.kernels.BUILTIN_KERNELS)
    x, z = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for name in ("linear", "polynomial", "cosine", "chebyshev"):
        torch.testing.assert_close(kernels.get(name)(x, z), kernel_matrix(x, z, name))
    torch.testing.assert_close(kernels.get("polynomial")(x, z, degree=3), kernel_matrix(x, z, "polynomial", degree=3))
    assert kernels.get("rbf").params == {"sigma2": None}
    with pytest.raises(ValueError, match="unknown parameter"):
        kernels.get("linear")(x, z, degree=2)


def test_a_plugin_cannot_silently_take_a_builtin_kernel_name():
    class Clash:
        @hookimpl
        def distillx_register_kernels(self, registry):
            registry.add("rbf", laplacian)

    with pytest.raises(ValueError, match=r"kernel 'rbf' is already provided by plugin 'distillx.kernels'; plugin "
                                         r"'clash' cannot"):
        get_plugin_manager().register(Clash(), name="clash")
    assert get_registries().kernels.provider("rbf") == "distillx.kernels"


def test_third_party_kernel_in_kfd_and_nst(laplacian_plugin):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)
        assert get_registries().kernels.provider("laplacian") == "laplace"
    torch.manual_seed(0)
    s, t = torch.randn(6, 4, dtype=torch.float64, requires_grad=True), torch.randn(6, 9, dtype=torch.float64)
    kfd = dx.method("kfd", student="a", teacher="b", kernel="laplacian")
    loss = kfd.loss({"pair0": s}, {"pair0": t})
    torch.testing.assert_close(loss, (laplacian(s, s) - laplacian(t, t)).pow(2).mean())
    loss.backward()
    assert s.grad.abs().sum() > 0

    nst = dx.method("nst", student="a", teacher="b", kernel="laplacian")
    fs, ft = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)
    expected = 0
    for b in range(2):
        x, z = F.normalize(fs[b].flatten(1), dim=1), F.normalize(ft[b].flatten(1), dim=1)
        expected = expected + (laplacian(x, x).mean() + laplacian(z, z).mean() - 2 * laplacian(x, z).mean()) / 2
    torch.testing.assert_close(nst.loss({"pair0": fs}, {"pair0": ft}), expected)
    with pytest.raises(ValueError, match="option sigma2 applies to the rbf kernel"):
        dx.method("kfd", kernel="laplacian", sigma2=1.0)


@pytest.mark.parametrize("options", [{"name": "kfd"},  # the penultimate features
                                     {"name": "nst", "student": "layer3", "teacher": "layer3", "weight": 100.0}])
def test_third_party_kernel_trains_through_the_distiller(laplacian_plugin, options):
    torch.manual_seed(0)
    teacher, student = CNN().eval(), CNN((4, 8, 8))
    before = snapshot(teacher)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    method = dx.method(kernel="laplacian", **options)
    d = Distiller(teacher, student, [method], task_weight=0.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                  scheduler=None)  # four steps: a decaying schedule would hide the learning this checks
    history = d.fit([(x, y)], epochs=4)
    assert history[-1][method.name] < 0.9 * history[0][method.name]
    assert unchanged(teacher, before)


def test_a_plugin_kernel_with_a_bad_result_is_named():
    """A registered kernel returning the wrong shape (a vector) or dtype: kfd and nst stop with an error
    naming it by its registered name and saying what it returned against the expected (N, M) floats."""
    class BadKernels:
        @hookimpl
        def distillx_register_kernels(self, registry):
            registry.add("row_sums", lambda x, z: (x @ z.T).sum(1))
            registry.add("signs", lambda x, z: (x @ z.T > 0).long())

    get_plugin_manager().register(BadKernels(), name="bad-kernels")
    torch.manual_seed(0)
    s, t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 9)
    kfd = dx.method("kfd", student="a", teacher="b", kernel="row_sums")
    with pytest.raises(ValueError, match=r"^kernel 'row_sums' \(.*\) returned a tensor of shape \(6,\) for x of 6 "
                                         r"rows and z of 6 rows; expected a floating-point tensor of shape \(6, 6\)"):
        kfd.loss({"pair0": s}, {"pair0": t})
    nst = dx.method("nst", student="a", teacher="b", kernel="signs")
    with pytest.raises(TypeError, match=r"^kernel 'signs' \(.*\) returned a tensor of dtype torch.int64"):
        nst.loss({"pair0": torch.randn(2, 3, 2, 2)}, {"pair0": torch.randn(2, 5, 2, 2)})
    assert "signs" in repr(nst.kernel)
