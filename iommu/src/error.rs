//! Displaying an error with its causes.
//!
//! iovmm's error messages say what failed and leave the why to their `#[source]`: a message
//! never repeats its source, so that printing the chain shows each cause once. Whoever prints
//! an error for a person (the CLI, a log line) prints the whole chain with [`chain`]:
//! `"cannot connect to the back end at /x: No such file or directory (os error 2)"`.
//!
//! ```
//! use iommu::error::chain;
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("cannot read the kernel")]
//! struct Load(#[source] std::io::Error);
//!
//! let e = Load(std::io::Error::from_raw_os_error(2));
//! assert_eq!(
//!     chain(&e).to_string(),
//!     "cannot read the kernel: No such file or directory (os error 2)"
//! );
//! ```

use std::error::Error;
use std::fmt;

/// `e` and its causes, `": "`-separated, as a [`fmt::Display`]; see [`chain`].
pub struct Chain<'a, E: ?Sized>(&'a E);

/// `e` followed by every [`Error::source`] below it: `"e: cause: root cause"`.
pub fn chain<E: Error + ?Sized>(e: &E) -> Chain<'_, E> {
    Chain(e)
}

impl<E: Error + ?Sized> fmt::Display for Chain<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

impl<E: Error + ?Sized> fmt::Debug for Chain<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("device on /sock")]
        Device(#[source] Inner),
        #[error("no cause")]
        Plain,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn every_cause_once_in_order() {
        let e = Outer::Device(Inner(std::io::Error::from_raw_os_error(2)));
        assert_eq!(
            chain(&e).to_string(),
            "device on /sock: cannot connect: No such file or directory (os error 2)"
        );
        assert_eq!(chain(&Outer::Plain).to_string(), "no cause");
        let boxed: Box<dyn Error + Send + Sync> = Box::new(e);
        assert!(format!("{}", chain(&*boxed)).ends_with("(os error 2)"));
    }
}
