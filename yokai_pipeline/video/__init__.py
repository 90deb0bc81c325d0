"""Video decoding backends for frame extraction: PyAV (CPU) and NVDEC (GPU), and keyframe segments.

``yokai_pipeline.frames`` owns what frame extraction means (shots, sharp picks, dedup); this
package owns how frames are decoded and analysed: :mod:`.segments` cuts an episode into
contiguous keyframe-aligned parts decoded at once, :mod:`.features` computes the per-frame
analysis (histogram, sharpness, small grey image) in torch on the GPU, and :mod:`.nvdec`
decodes with PyNvVideoCodec, the frames staying in GPU memory.
"""
