"""The fused NLSTM sequence as CUDA graphs: one captured forward and one captured backward per
cell and input shape, replayed at every training step.

On CUDA the fused Function (training.nlstm_fused) launches some 20 small kernels per time step and
level in the forward pass and 30 in the backward; at the paper's batch of 32 each runs for a few
microseconds, so a step is bound by kernel launches from Python, not by the GPU. A CUDA graph
records those launches once and replays them as one: the same kernels on the same buffers,
without Python or the launch overhead in between.

What a graph needs, and how this file provides it:
  * fixed shapes and fixed memory: one `_GraphedSequence` per (cell, T, B, dtype, device, outer
    activation); each holds static input buffers (the caller's tensors are copied in before a
    replay), and the buffers the capture allocated (outputs, saved activations, gradients) stay
    in the graph's private memory pool;
  * no reuse while in use: a replay of the forward overwrites the activations the previous
    forward saved for its backward. Training runs forward, backward, forward, ...; a second
    forward through the same cell and shape before the first one's backward (two sequences in
    one loss) makes that backward raise instead of using the wrong activations;
  * copies out: outputs and gradients leave the graph's buffers as fresh tensors, so nothing
    the caller keeps (a carried state, a parameter's .grad) is overwritten by the next replay.

`NestedLSTM(cuda_graphs=True)` uses this for CUDA inputs when gradients are on; the CPU, and
evaluation under no_grad, run the eager fused path (the CPU has no launch overhead to remove).
The captured code is `sequence_forward` / `sequence_backward` of training.nlstm_fused, the eager
path's own code, so both compute the same function.

This file imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from training.nlstm_fused import sequence_backward, sequence_forward

MAX_GRAPHS_PER_CELL = 4  # shapes kept per cell (training uses one; a last short batch a second)


class _GraphedSequence:
    """The captured forward and backward of one cell's sequence for one set of shapes."""

    def __init__(self, example: list[Tensor], n_inner: int, tanh_outer: bool) -> None:
        self.n_inner, self.tanh_outer = n_inner, tanh_outer
        self.generation = 0  # bumped by every forward replay
        self.static_in = [t.detach().clone() for t in example]
        xproj, w_hh0, inner, state0 = self._split(self.static_in)
        D = len(state0) - 1

        def forward():
            return sequence_forward(xproj, w_hh0, inner, state0, tanh_outer)

        # Warm up on a side stream before capturing (as torch.cuda.make_graphed_callables
        # does): cuBLAS creates its handles and workspaces, the allocator its blocks, outside
        # the graph.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                outs, saved = forward()
                sequence_backward(saved, *self._grad_args([torch.ones_like(o) for o in outs], D))
        torch.cuda.current_stream().wait_stream(side)
        del outs, saved

        self.fwd_graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.fwd_graph):
            self.static_out, self.saved = forward()
        self.static_grad_out = [torch.zeros_like(o) for o in self.static_out]
        self.bwd_graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.bwd_graph, pool=self.fwd_graph.pool()):
            self.static_grad_in = sequence_backward(
                self.saved, *self._grad_args(self.static_grad_out, D)
            )

    def _split(self, flat: list[Tensor]):
        n = self.n_inner
        return flat[0], flat[1], list(flat[2 : 2 + n]), list(flat[2 + n :])

    def _grad_args(self, grads: list[Tensor], D: int):
        return grads[0], grads[1], list(grads[2 : 2 + D]), self.tanh_outer

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, ...]:
        for static, t in zip(self.static_in, inputs, strict=True):
            static.copy_(t)
        self.fwd_graph.replay()
        self.generation += 1
        return tuple(o.clone() for o in self.static_out)

    def backward(self, grads: tuple[Tensor | None, ...]) -> list[Tensor]:
        for static, g in zip(self.static_grad_out, grads, strict=True):
            if g is None:
                static.zero_()
            else:
                static.copy_(g)
        self.bwd_graph.replay()
        return [g.clone() for g in self.static_grad_in]


class _GraphedNestedLSTMSequence(torch.autograd.Function):
    """NestedLSTMSequence's interface (training.nlstm_fused), run by replaying `graphed`'s
    graphs."""

    @staticmethod
    def forward(ctx, graphed: _GraphedSequence, xproj, w_hh0, *rest):
        outs = graphed.forward([xproj, w_hh0, *rest[:-1]])
        ctx.graphed, ctx.generation = graphed, graphed.generation
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        graphed = ctx.graphed
        if graphed.generation != ctx.generation:
            raise RuntimeError(
                "a CUDA-graphed NLSTM sequence was run forward again (same cell, same shapes) "
                "before the backward pass of an earlier run: its graph keeps one sequence's "
                "activations. Backpropagate each sequence before the next forward, or set "
                "NestedLSTM.cuda_graphs = False"
            )
        return (None, *graphed.backward(grads), None)


def graphed_sequence(
    cell, xproj: Tensor, w_hh0: Tensor, inner: list[Tensor], state, tanh_outer: bool
):
    """Run the fused sequence of `cell` through its CUDA graphs (captured on first use of
    these shapes). Arguments as NestedLSTMSequence.apply's; returns its outputs."""
    key = (tuple(xproj.shape), xproj.dtype, xproj.device, tanh_outer)
    graphs = cell.__dict__.setdefault("_cuda_graphs", {})  # not a buffer: never in state_dict
    graphed = graphs.get(key)
    if graphed is None:
        if len(graphs) >= MAX_GRAPHS_PER_CELL:
            graphs.pop(next(iter(graphs)))  # the oldest shape
        example = [xproj, w_hh0, *inner, *state]
        graphed = graphs[key] = _GraphedSequence(example, len(inner), tanh_outer)
    return _GraphedNestedLSTMSequence.apply(graphed, xproj, w_hh0, *inner, *state, tanh_outer)
