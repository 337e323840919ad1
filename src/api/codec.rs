//! The codec of the generated service and client: prost, with buffers sized for this API's
//! messages instead of tonic's 8 KiB default.
//!
//! tonic gives every RPC an encode buffer of `BufferSettings::buffer_size` that lives as long as
//! the RPC. A WatchReleaseEvents stream lives for hours and sends messages of a few hundred
//! bytes, so the default held 8 KiB per stream of mostly empty buffer: 234 MiB at 30 000
//! streams (BENCHMARKS.md). A larger message still fits: the buffer grows for it.
use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Room for any one message of this API but an unusually large ReleaseCall error; tonic's
/// default yield threshold (32 KiB) is kept.
const BUFFER_SIZE: usize = 512;
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with buffers of `BUFFER_SIZE` bytes. `build.rs` names it as the codec of the
/// generated code.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}
