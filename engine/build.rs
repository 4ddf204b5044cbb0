//! Links libvmaf 2.3.1 (static, with its built-in models), which `make setup` builds into the cache
//! (`scripts/setup.sh`). `LIBVMAF_DIR` names another install prefix (with `lib/libvmaf.a`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBVMAF_DIR");
    println!("cargo:rerun-if-env-changed=TESSERA_CACHE");
    let dir = std::env::var_os("LIBVMAF_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("TESSERA_CACHE").map(|c| PathBuf::from(c).join("libvmaf-2.3.1"))
        })
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("tessera").join("libvmaf-2.3.1"))
        })
        .expect("no LIBVMAF_DIR, TESSERA_CACHE or HOME to find libvmaf under");
    let lib = dir.join("lib");
    if !lib.join("libvmaf.a").is_file() {
        panic!(
            "libvmaf not found: {} has no libvmaf.a. Run `make setup` (it builds libvmaf 2.3.1 into the \
             cache), or set LIBVMAF_DIR to a libvmaf install prefix.",
            lib.display()
        );
    }
    println!("cargo:rerun-if-changed={}", lib.join("libvmaf.a").display());
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=static=vmaf");
    // libvmaf's SVM (libsvm) is C++.
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo:rustc-link-lib=dylib=m");
    println!("cargo:rustc-link-lib=dylib=pthread");
}
