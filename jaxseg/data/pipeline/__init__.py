"""Host-side training data pipeline: which cases, which patches, read with threads (nnU-Net; Fidon et al. 2021).

Data flow: case store (tensorstore) -> :class:`CaseSource` (random access over the
prepared cases) -> :class:`CaseSampler` (draws the case indices of each GLOBAL batch, in the
training process) -> patch reader (nnU-Net patch centres, a region larger than the patch, read
with ``store.read_patch``) -> :class:`PatchBatchIterator` (threads, prefetch, process shard,
checkpointable state) -> numpy batch -> device (augmentation and the train step are jitted).

Public API
    ``CaseSource(root, split=None, require_label=True, case_ids=None)``
        grain ``RandomAccessDataSource``: ``len(src)``, ``src[i]`` -> ``store.StoredCase``
        (opened lazily, cached), ``src.case_ids``, ``src.metas``, ``src.shapes``.
    ``CaseSampler(n_cases, mode="uniform" | "weighted" | "hardness", seed=0, beta=100, floor=1e-4)``
        ``draw(batch_size, step=None)``, ``update(cases, losses)``, ``set_table(table)``,
        ``set_probs(p)``, ``probabilities()``, ``stale_losses(cases)``,
        ``state_dict()`` / ``load_state_dict(d)`` (JSON-ready).
    ``patch_start(rng, shape, patch_size, fg, force_fg)`` (nnU-Net's bbox rule; pure function)
    ``PatchBatchIterator(source, sampler, batch_size=..., patch_size=..., margin=0, ...)``
        a ``grain.DatasetIterator``: ``next(it)`` -> batch dict, ``get_state()`` /
        ``set_state()`` (JSON-ready; also orbax-checkpointable through grain's ``save``/``load``),
        ``last_global_case_index`` (the whole global batch, for ``sampler.update``).

Batch (the process's slice of the global batch, ``b = batch_size // process_count``, static
shapes; region ``R = patch_size + 2 * margin`` per axis)::

    image       (b, Rx, Ry, Rz, C) float32   zero outside the volume
    label       (b, Rx, Ry, Rz)    int32     zero outside the volume (and for unlabelled cases)
    mask        (b, Rx, Ry, Rz)    float32   label availability: ones everywhere without a
                                             ``mask_fn`` (padding counts as background, as in
                                             nnU-Net); with a ``mask_fn`` its crop at the same
                                             region, zero outside the volume; zero for unlabelled
                                             cases
    case_index  (b,)               int32     index into ``source`` (and the sampler's table)
    origin      (b, 3)             int32     voxel of the full volume at ``image[i, 0, 0, 0]``
                                             (may be negative); the patch proper starts at
                                             ``origin + margin`` (the centre crop the on-device
                                             augmentation takes, ``augment(..., out_shape=patch)``)
    fg_forced   (b,)               bool      this patch was centred on a foreground voxel

No strings in the batch (it goes to the device as is); ``source.case_ids[case_index]`` names them.

Randomness is counter based, never a shared sequential stream: the case draw of global step
``t`` uses ``SeedSequence((sampler.seed, 0, t))``, the patch of global batch slot ``g`` at step
``t`` uses ``SeedSequence((iterator.seed, 1, t, g))``. Hence the same seed gives the same batches
whatever the number of threads, the prefetch depth or the number of processes (the slices of P
processes concatenate to the single-process batch), and the iterator state is just
``(step, seed, sampler table)``.

Foreground oversampling (nnU-Net, Isensee et al. 2021): ``oversample="last"`` (the default) is
nnU-Net v2's rule, the last ones of each GLOBAL batch are forced: slot ``g`` is forced iff
``g >= round(B * (1 - p))`` (with B = 2 and p = 0.33 that forces one patch in two, which is what
nnU-Net actually trains with). With ``oversample="random"`` each sample is forced, independently,
with probability ``foreground_oversampling`` (33 % of the patches on average for any batch size
and process count). A forced patch is centred on a random voxel (from ``case.fg``) of a random
foreground class present in the case, then shifted to fit like nnU-Net's ``get_bbox``; otherwise
the patch start is uniform over the positions where the patch fits in the volume (centred with
padding on an axis where the volume is smaller than the patch). Cases without foreground fall
back to uniform.

Prefetch versus live weights (Fidon et al. 2021: "sample in the process that owns the table")
    * A static sampler (``mode="uniform"``): the draw of step t is a pure function of
      ``(seed, t)``, so the whole stream is a grain ``MapDataset`` indexed by element number
      (``MapDataset.range -> map(read one patch) -> to_iter_dataset(ReadOptions(num_threads,
      prefetch_buffer_size)) -> batch``): grain threads read ``prefetch`` batches ahead, and
      drawing ahead is correct because nothing can change the draw.
    * A dynamic sampler (``"weighted"``, ``"hardness"``): the draw of step t + 1 must see the
      ``update``/``set_probs`` made after step t. grain's thread prefetch submits element reads
      for indices ahead of the consumer, which would fix the cases of batch t + 1 before the loss
      of step t is known (the reference code's bug, with forked workers). So the iterator draws
      at ``next()`` time in the calling process (draw-ahead depth 0) and only the reading of the
      ``b`` patches of that batch is threaded. Cost: the read of batch t + 1 cannot overlap step
      t on the device (it starts when the loop asks for it, after the update). That is inherent
      to "react on the very next draw"; everything else (augmentation) is on the device.

Multi-process: every process draws the same GLOBAL batch (same seed, same table, same step) and
reads only its slice ``[process_index * b, (process_index + 1) * b)``. For the hardness sampler
every process must call ``update`` with the same GLOBAL per-sample losses (e.g. the
all-gathered loss vector of the step, in global slot order, with
``iterator.last_global_case_index``), so the tables and therefore the draws stay identical.

Label budgeting: pass ``mask_fn(case_id, shape) -> (X, Y, Z) array`` (1 = labelled), e.g.
``lambda cid, shape: jaxseg.data.budget.slice_mask(shape, axis="random", fraction=1/3, seed=0,
case_id=cid)``; the full mask of a case is cached (LRU) and cropped at the patch region.
"""


from jaxseg.data.pipeline.iterator import PatchBatchIterator
from jaxseg.data.pipeline.patches import OVERSAMPLE_MODES, patch_start
from jaxseg.data.pipeline.sampler import SAMPLER_MODES, CaseSampler
from jaxseg.data.pipeline.source import CaseSource

__all__ = [
    "CaseSource",
    "CaseSampler",
    "PatchBatchIterator",
    "patch_start",
    "SAMPLER_MODES",
    "OVERSAMPLE_MODES",
]
