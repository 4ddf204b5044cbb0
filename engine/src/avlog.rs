//! FFmpeg's log, routed into `tracing`, with a per-thread capture so that an error can carry FFmpeg's own
//! explanation (e.g. "Cannot load libnvidia-encode.so.1") instead of a bare "Generic error in an external
//! library".

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Once;

use ffmpeg_next::ffi;

thread_local! {
    static CAPTURE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

static INIT: Once = Once::new();

/// Initialise FFmpeg once and install the log bridge.
pub fn init() {
    INIT.call_once(|| {
        ffmpeg_next::init().expect("FFmpeg libraries failed to initialise");
        // SAFETY: the callback only formats into a stack buffer and touches thread-local state.
        unsafe { ffi::av_log_set_callback(Some(callback)) };
    });
}

unsafe extern "C" fn callback(
    avcl: *mut c_void,
    level: c_int,
    fmt: *const c_char,
    vl: *mut ffi::__va_list_tag,
) {
    if level > ffi::AV_LOG_VERBOSE {
        return;
    }
    let mut buf = [0 as c_char; 1024];
    let mut prefix: c_int = 1;
    // SAFETY: FFmpeg hands us a valid format and va_list; the buffer size is passed along.
    unsafe {
        ffi::av_log_format_line2(
            avcl,
            level,
            fmt,
            vl,
            buf.as_mut_ptr(),
            buf.len() as c_int,
            &mut prefix,
        )
    };
    // SAFETY: av_log_format_line2 always NUL-terminates within the buffer.
    let line = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .trim_end()
        .to_string();
    if line.is_empty() {
        return;
    }
    if level <= ffi::AV_LOG_ERROR {
        let captured = CAPTURE.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                if v.len() < 16 {
                    v.push(line.clone());
                }
                true
            } else {
                false
            }
        });
        if !captured {
            tracing::debug!(target: "ffmpeg", "{line}");
        }
    } else if level <= ffi::AV_LOG_WARNING {
        tracing::debug!(target: "ffmpeg", "{line}");
    } else {
        tracing::trace!(target: "ffmpeg", "{line}");
    }
}

/// Run `f` while collecting FFmpeg's error lines logged on this thread; returns them with the result.
pub fn capture<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let prev = CAPTURE.with(|c| c.borrow_mut().replace(Vec::new()));
    let out = f();
    let lines = CAPTURE
        .with(|c| std::mem::replace(&mut *c.borrow_mut(), prev))
        .unwrap_or_default();
    (out, lines)
}

/// "error (ffmpeg: line1; line2)" or just "error".
pub fn explain(err: impl std::fmt::Display, lines: &[String]) -> String {
    let lines: Vec<&str> = lines
        .iter()
        .map(|l| l.split_once("] ").map_or(l.as_str(), |(_, m)| m))
        .collect();
    if lines.is_empty() {
        err.to_string()
    } else {
        format!("{err} ({})", lines.join("; "))
    }
}
