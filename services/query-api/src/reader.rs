//! Reading the views view-builder keeps in Redis, by the wire contract's read protocol
//! ([`thermo_domain::views`]): one Lua script per read, so every answer is consistent.

use redis::aio::ConnectionManager;
use thermo_domain::views::{
    self, History, Positions, READ_SCRIPT, Read, SensorView, ViewList, ViewPage,
};

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The script answered something unexpected.
    #[error(transparent)]
    Protocol(#[from] views::BadAnswer),
}

/// Reads of the active generation of the views.
#[derive(Clone)]
pub struct ViewReader {
    conn: ConnectionManager,
    read: redis::Script,
}

impl std::fmt::Debug for ViewReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewReader")
    }
}

impl ViewReader {
    /// A reader on `conn`.
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            read: redis::Script::new(READ_SCRIPT),
        }
    }

    async fn read(&self, what: Read<'_>) -> Result<Vec<String>, ReadError> {
        let (kind, arg, limit) = what.args();
        let mut conn = self.conn.clone();
        Ok(self
            .read
            .arg(kind)
            .arg(arg)
            .arg(limit)
            .arg(what.cursor())
            .invoke_async(&mut conn)
            .await?)
    }

    async fn list(&self, what: Read<'_>) -> Result<ViewList, ReadError> {
        let (list, undecodable) = views::parse_view_list(&self.read(what).await?)?;
        for id in undecodable {
            tracing::warn!(sensor_id = %id, "undecodable view; skipped");
        }
        Ok(list)
    }

    async fn page(&self, what: Read<'_>) -> Result<ViewPage, ReadError> {
        let (page, undecodable) = views::parse_view_page(&self.read(what).await?)?;
        for id in undecodable {
            tracing::warn!(sensor_id = %id, "undecodable view; skipped");
        }
        Ok(page)
    }

    /// Every sensor's view, by id (O(all sensors): the API reads pages).
    pub async fn sensors(&self) -> Result<ViewList, ReadError> {
        self.list(Read::Sensors).await
    }

    /// At most `limit` views by id, after the id `after` (`""`: from the first).
    pub async fn sensors_page(&self, after: &str, limit: usize) -> Result<ViewPage, ReadError> {
        self.page(Read::SensorsPage { after, limit }).await
    }

    /// At most `limit` views of `site` by |delta| descending, after the cursor `after`
    /// (`"<score>:<id>"`, `""`: from the first).
    pub async fn site_page(
        &self,
        site: &str,
        after: &str,
        limit: usize,
    ) -> Result<ViewPage, ReadError> {
        self.page(Read::SitePage { site, after, limit }).await
    }

    /// One sensor's view.
    pub async fn sensor(&self, id: &str) -> Result<Option<SensorView>, ReadError> {
        Ok(self.sensor_at(id).await?.0)
    }

    /// One sensor's view and where the views stood when it was read.
    pub async fn sensor_at(&self, id: &str) -> Result<(Option<SensorView>, Positions), ReadError> {
        let mut list = self.list(Read::Sensor(id)).await?;
        Ok((list.views.pop(), list.positions))
    }

    /// A site's sensors by |delta| descending (ties by id).
    pub async fn site(&self, site: &str) -> Result<ViewList, ReadError> {
        self.list(Read::Site(site)).await
    }

    /// The first `limit` sensors of the ranking (`abs(delta)` descending, ties by id).
    pub async fn top(&self, limit: usize) -> Result<ViewList, ReadError> {
        self.list(Read::Top(limit)).await
    }

    /// A sensor's history, `None` if it has no view.
    pub async fn history(&self, id: &str) -> Result<Option<History>, ReadError> {
        Ok(views::parse_history(&self.read(Read::History(id)).await?)?)
    }
}
